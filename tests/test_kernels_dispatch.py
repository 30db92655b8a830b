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


def test_torch_backend_on_cpu_matches_dequantized_weight(monkeypatch):
    monkeypatch.setenv("CCQ_BACKEND", "torch")
    qt, x = tiny_qt(), torch.randn(3, 16)
    w = kernels.dequantize(qt, torch.float32)
    torch.testing.assert_close(kernels.qlinear(x, qt), x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_benchmark_refuses_to_run_without_cuda(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
