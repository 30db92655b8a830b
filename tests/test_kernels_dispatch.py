"""Backend choice of the public kernel functions, and the benchmark's refusal to run without CUDA."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ccq import kernels
from ccq.codec.codes import get_code
from ccq.codec.hadamard import random_signs
from ccq.codec.tensor import FORMAT_VERSION, QuantizedTensor

ROOT = Path(__file__).resolve().parents[1]


def tiny_qt():
    meta = torch.tensor([FORMAT_VERSION, 2, 16, get_code("mul1").code_id, 16, 0, 0, 16, 16], dtype=torch.int32)
    return QuantizedTensor(torch.zeros(1, 1, 32, dtype=torch.int16), torch.ones(16, dtype=torch.float16),
                           random_signs(16, 0), None, meta)


def test_default_backend_follows_device(monkeypatch):
    monkeypatch.delenv("CCQ_BACKEND", raising=False)
    assert kernels.backend(torch.device("cpu")) == "torch"
    assert kernels.backend(torch.device("cuda")) == "triton"


@pytest.mark.parametrize("forced", ["torch", "triton", " Triton "])
def test_env_forces_backend(monkeypatch, forced):
    monkeypatch.setenv("CCQ_BACKEND", forced)
    assert kernels.backend(torch.device("cuda")) == forced.strip().lower()
    assert kernels.backend(torch.device("cpu")) == forced.strip().lower()


def test_bad_backend_name_is_one_line_error(monkeypatch):
    monkeypatch.setenv("CCQ_BACKEND", "cuda")
    with pytest.raises(ValueError, match="CCQ_BACKEND must be 'torch' or 'triton', got 'cuda'"):
        kernels.qlinear(torch.randn(1, 16), tiny_qt())


def test_forced_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("CCQ_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        kernels.qlinear(torch.randn(1, 16), tiny_qt())


def test_inputs_that_need_gradients_take_the_differentiable_reference(monkeypatch):
    """The Triton kernels have no backward: fine-tuning through a quantized model (gradients to the
    layers before it) must not lose them, even where Triton is the backend."""
    import ccq

    monkeypatch.setenv("CCQ_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a Triton call would raise here
    qt, x = tiny_qt(), torch.randn(3, 16, requires_grad=True)
    kernels.qlinear(x, qt).sum().backward()
    torch.testing.assert_close(x.grad, kernels.reference.dequantize(qt, torch.float32).sum(0).expand(3, 16))
    g = torch.Generator().manual_seed(0)
    gate_up = ccq.quantize_tensor(torch.randn(2, 32, 16, generator=g), bits=2, L=8)
    down = ccq.quantize_tensor(torch.randn(2, 16, 16, generator=g), bits=2, L=8)
    h, idx = torch.randn(3, 16, requires_grad=True), torch.tensor([[0, 1], [1, 0], [0, 1]])
    w = torch.full((3, 2), 0.5, requires_grad=True)
    kernels.qmoe(h, idx, w, gate_up, down).sum().backward()
    assert h.grad is not None and w.grad is not None and h.grad.abs().sum() > 0
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs CUDA tensors"):
        kernels.qlinear(x, qt)


def test_torch_backend_on_cpu_matches_dequantized_weight(monkeypatch):
    monkeypatch.setenv("CCQ_BACKEND", "torch")
    qt, x = tiny_qt(), torch.randn(3, 16)
    w = kernels.dequantize(qt, torch.float32)
    torch.testing.assert_close(kernels.qlinear(x, qt), x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_benchmark_refuses_to_run_without_cuda(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_speed.py"), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def packed(E, out, inp, bits=2, had=512):
    """A meta-device QuantizedTensor (a stack of E when E > 0) with `had`-blocks on the input side."""
    lead = (E,) if E else ()
    meta_vec = torch.tensor([FORMAT_VERSION, bits, 16, get_code("mul1").code_id, had, 0, E, out, inp],
                            dtype=torch.int32)
    words = meta(*lead, out // 16, inp // 16, 16 * bits, dtype=torch.int16)
    return QuantizedTensor(words, meta(*lead, out, dtype=torch.float16), random_signs(inp, 0).to("meta"), None,
                           meta_vec)


def test_moe_decode_step_launches_and_has_no_host_sync():
    """One token through a 28B-shaped MoE layer on meta tensors (a host read would raise): three Triton
    launches (the input transform, which zeroes the output; gate_up with SwiGLU and down's input transform;
    down with the weighted sum and the cast) and no torch kernel: on tensor cores with 512-blocks, on CUDA
    cores with 64-blocks (below the tensor-core path's 128)."""
    from ccq.kernels import launch, moe

    for had, kernel, fused in ((512, "_gemv_tc_kernel", "ATOMIC"), (64, "_gemv_kernel", "FINISH")):
        gu, dn = packed(64, 2 * 1536, 2560, had=had), packed(64, 2560, 1536, had=had)
        with launch.record() as recs:
            step = lambda: moe.qmoe(meta(1, 2560), meta(1, 6, dtype=torch.long), meta(1, 6), gu, dn)  # noqa: E731
            n_torch = launch.torch_kernels(step)
        assert [r.name for r in recs] == ["_hadamard_kernel", kernel, kernel]
        assert n_torch == 0
        assert recs[1].kwargs["HAD"] == had and recs[2].kwargs[fused]


def test_moe_prefill_launches_and_has_no_host_sync():
    """More tokens through a 28B-shaped MoE layer on meta tensors, four Triton launches and no torch kernel:
    at 64 / 200 tokens (6 / 19 pairs per expert on average) align in blocks of 8 / 16 pairs, the input
    transform (which zeroes the output sum and tickets) and the two sorted tensor-core launches (8 / 16 MMA
    columns); at 700 tokens (66 per expert) align in blocks of 64, the transform and the two routed GEMMs
    (gate_up with SwiGLU and down's input transform; down with the weighted sum and the cast)."""
    from ccq.kernels import launch, moe

    gu, dn = packed(64, 2 * 1536, 2560), packed(64, 2560, 1536)
    for tokens, kernel, bm in ((64, "_gemv_tc_kernel", 8), (200, "_gemv_tc_kernel", 16), (700, "_gemm_kernel", 64)):
        with launch.record() as recs:
            step = lambda: moe.qmoe(meta(tokens, 2560), meta(tokens, 6, dtype=torch.long), meta(tokens, 6),  # noqa: E731
                                    gu, dn)
            n_torch = launch.torch_kernels(step)
        assert [r.name for r in recs] == ["_align_kernel", "_hadamard_kernel", kernel, kernel]
        assert n_torch == 0
        assert recs[0].kwargs["BM"] == bm and recs[1].kwargs["ZB"] > 0 and recs[2].kwargs["HAD"] == 512
        if kernel == "_gemm_kernel":
            assert recs[3].kwargs["WEIGHTED"] and recs[3].kwargs["FINISH"]
        else:
            assert recs[2].kwargs["SORTED"] and recs[3].kwargs["SORTED"] and recs[3].kwargs["ATOMIC"]
            assert recs[2].kwargs["NT"] == recs[3].kwargs["NT"] == bm


def test_dense_batch1_launches_and_has_no_host_sync():
    """qlinear at one row with a bias, K split on grid axis 2: on tensor cores with 512-blocks one launch (the
    GEMV transforms its own K slice; its split-K sum, zeroed once when first used, clears itself: no torch
    kernel from the second call on); on CUDA cores with 64-blocks the transform (zeroing the split-K sums)
    and the GEMV (bias, cast)."""
    from ccq.kernels import gemm, launch

    qt = packed(0, 3072, 2560, had=512)
    for call in range(2):
        with launch.record() as recs:
            n_torch = launch.torch_kernels(lambda: gemm.qlinear(meta(1, 2560), qt, meta(3072)))
        assert [r.name for r in recs] == ["_gemv_tc_kernel"] and n_torch == (1 - call)
        assert recs[0].kwargs["HAD"] == 512 and recs[0].kwargs["CLEAR"] and recs[0].grid[2] > 1
    qt = packed(0, 3072, 2560, had=64)
    with launch.record() as recs:
        n_torch = launch.torch_kernels(lambda: gemm.qlinear(meta(1, 2560), qt, meta(3072)))
    assert [r.name for r in recs] == ["_hadamard_kernel", "_gemv_kernel"]
    assert n_torch == 0
    assert recs[0].kwargs["ZB"] > 0 and recs[1].grid[2] > 1
