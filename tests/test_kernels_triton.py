"""Every Triton kernel against the torch reference, on the CPU through Triton's interpreter.

Packed tensors are random trellis words (every bit pattern is a valid tail-biting stream),
so the tests cover all bit widths, both code kinds, small and full L and padded shapes
without running the Viterbi search.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' first import
pytest.importorskip("triton")

from ccq import kernels  # noqa: E402
from ccq.codec.codes import get_code  # noqa: E402
from ccq.codec.hadamard import hadamard_block_size, random_signs, transform_activations  # noqa: E402
from ccq.codec.tensor import FORMAT_VERSION, QuantizedTensor  # noqa: E402
from ccq.kernels import reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("CCQ_BACKEND", "triton")


def random_qt(shape, bits, L=16, code="mul1", rotate_output=False, seed=0, hadamard_block=512):
    """A QuantizedTensor with random codes, the layout `quantize_tensor` writes."""
    g = torch.Generator().manual_seed(seed)
    *lead, out, inp = shape
    op, ip = -(-out // 16) * 16, -(-inp // 16) * 16
    words = torch.randint(-32768, 32768, (*lead, op // 16, ip // 16, 16 * bits), generator=g, dtype=torch.int32)
    scales = (torch.rand(*lead, op, generator=g) * 0.05 + 0.01).half()
    had_in = hadamard_block_size(ip, hadamard_block)
    had_out = hadamard_block_size(op, hadamard_block) if rotate_output else 0
    meta = torch.tensor([FORMAT_VERSION, bits, L, get_code(code).code_id, had_in, had_out,
                         lead[0] if lead else 0, out, inp], dtype=torch.int32)
    signs_out = random_signs(op, seed + 2) if rotate_output else None
    return QuantizedTensor(words.to(torch.int16), scales, random_signs(ip, seed + 1), signs_out, meta).to(DEV)


def moe_pair(E, H, inter, bits, code, seed):
    """gate_up [E, 2 * inter, H] and down [E, H, inter] with 512-blocks (seeds seed, seed + 1), L = 16."""
    return (random_qt((E, 2 * inter, H), bits, 16, code, False, seed=seed, hadamard_block=512),
            random_qt((E, H, inter), bits, 16, code, False, seed=seed + 1, hadamard_block=512))


def close(got, want, rtol):
    got, want = got.float(), want.float()
    err = (got - want).abs().max().item()
    assert err <= rtol * want.abs().max().item() + 1e-6, f"max error {err} vs scale {want.abs().max().item()}"


# (bits, L, code, rotate_output): every bit width, both code kinds, full and small L
CASES = [(2, 16, "mul1", False), (2, 12, "mcg", True), (3, 16, "mcg", False), (3, 10, "1mad", True),
         (4, 16, "3inst", True), (4, 8, "mul1", False)]


@pytest.mark.parametrize("bits,L,code,rot", CASES)
def test_dequantize_matches_reference(bits, L, code, rot):
    qt = random_qt((2, 40, 72), bits, L, code, rot, seed=bits)  # padded on both sides
    close(kernels.dequantize(qt, torch.float32), reference.dequantize(qt, torch.float32), 1e-5)


@pytest.mark.parametrize("bits,L,code,rot", CASES)
@pytest.mark.parametrize("rows", [1, 3, 7, 33])
@pytest.mark.parametrize("decode", ["gather", "runs"])
def test_qlinear_fp32_matches_reference(bits, L, code, rot, rows, decode):
    """GEMV (rows <= 4) and tensor-core GEMM paths, both decodes, padded in and out dims, with bias."""
    from ccq.kernels.gemm import qlinear

    x = torch.randn(rows, 70, device=DEV)[:, :68]  # in = 68 < in_pad = 80, strided rows
    qt = random_qt((40, 68), bits, L, code, rot, seed=rows)
    bias = torch.randn(40, device=DEV)
    got = qlinear(x, qt, bias, decode=decode)
    assert got.shape == (rows, 40) and got.dtype == x.dtype
    close(got, reference.qlinear(x, qt, bias), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qlinear_half_inputs(dtype):
    qt = random_qt((48, 96), 2, 16, "mcg", False, seed=5)
    x = torch.randn(2, 5, 96, device=DEV).to(dtype)  # leading dims, 10 rows: GEMM path
    got = kernels.qlinear(x, qt)
    assert got.shape == (2, 5, 48) and got.dtype == dtype
    close(got, reference.qlinear(x.float(), qt), 2e-2)


@pytest.mark.parametrize("bits,L,code,rot", CASES[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlinear_prefill_decodes_once(bits, L, code, rot, dtype, monkeypatch):
    """Prefill sizes: one decode of W' and a torch GEMM, padded dims, bias, rotated output."""
    from ccq.kernels import gemm, launch

    monkeypatch.setattr(gemm, "DEQUANT_MIN_MACS", 0)  # a small weight, so that the rows alone decide
    rows = gemm.DEQUANT_MIN_ROWS + 3
    qt = random_qt((40, 68), bits, L, code, rot, seed=rows)
    assert not gemm.decode_once(rows - 4, qt)
    x = torch.randn(rows, 70, device=DEV)[:, :68].to(dtype)
    bias = torch.randn(40, device=DEV).to(dtype)
    with launch.record() as recs:  # what the dispatcher launches (recorded, not run)
        kernels.qlinear(x, qt, bias)
    assert [r.name for r in recs].count("_dequant_kernel") == 1 and "_gemm_kernel" not in [r.name for r in recs]
    got = kernels.qlinear(x, qt, bias)
    assert got.shape == (rows, 40) and got.dtype == dtype
    close(got, reference.qlinear(x.float(), qt, bias.float()), 1e-5 if dtype == torch.float32 else 2e-2)


def test_qlinear_no_rows():
    qt = random_qt((40, 72), 3, 16, "mul1", True)
    assert kernels.qlinear(torch.randn(2, 0, 72, device=DEV), qt).shape == (2, 0, 40)


@pytest.mark.parametrize("block", [1, 2, 16, 512])
@pytest.mark.parametrize("sign_after", [False, True])
def test_hadamard_matches_reference(block, sign_after):
    from ccq.kernels.hadamard import transform

    n = 1024 if block == 512 else 48
    s = random_signs(n, 3).to(DEV)
    x = torch.randn(5, n - 3, device=DEV)  # zero padded to n by the kernel
    xp = F.pad(x, (0, 3))
    want = transform_activations(xp, s, block) if not sign_after else \
        transform_activations(xp, torch.ones_like(s), block) * s
    close(transform(x, s, block, sign_after=sign_after), want, 1e-5)


@pytest.mark.parametrize("block,rows", [(256, 1), (512, 3), (512, 20)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hadamard_on_tensor_cores(block, rows, dtype):
    """16-bit outputs of blocks >= 256 take H(B1) V H(B2) as two matmuls (`fwht_mma`): the same values as the
    butterflies to the output's rounding; fp32 outputs keep the butterflies."""
    from ccq.kernels import hadamard

    assert hadamard.mma_ok(block, rows, dtype, False) and not hadamard.mma_ok(block, rows, torch.float32, False)
    assert not hadamard.mma_ok(block, rows, dtype, True) and not hadamard.mma_ok(128, rows, dtype, False)
    s = random_signs(1024, 6).to(DEV)
    x = torch.randn(rows, 1000, device=DEV) * 3
    for sign_after in (False, True):
        want = transform_activations(F.pad(x, (0, 24)), s if not sign_after else torch.ones_like(s), block)
        want = want * s if sign_after else want
        got = hadamard.transform(x, s, block, dtype, sign_after=sign_after)
        assert got.dtype == dtype
        close(got, want, 1e-2)


def test_align_sorts_and_pads_by_expert():
    from ccq.kernels.moe import align

    idx = torch.tensor([[2, 0], [2, 9], [0, 2]], device=DEV)  # expert 1 unused, 9 dropped
    ids, expert_ids = align(idx, 4, 4)
    n = idx.numel()
    blocks = ids.view(-1, 4)
    used = expert_ids >= 0
    assert expert_ids[used].tolist() == [0, 2]
    assert sorted(blocks[0][blocks[0] < n].tolist()) == [1, 4]  # flat slots routed to expert 0
    assert sorted(blocks[1][blocks[1] < n].tolist()) == [0, 2, 5]
    assert (blocks[~used] == n).all()


@pytest.mark.parametrize("T,K,E,bm", [(5, 3, 70, 16), (64, 6, 64, 16), (130, 8, 8, 16)])
def test_align_kernel_matches_torch(T, K, E, bm):
    """The Triton align against the torch one on random routings: skipped slots (>= E and negative), empty
    experts (E > used), several sort chunks (130 * 8 pairs > ALIGN_CHUNK), exact ids and block experts."""
    from ccq.kernels.moe import ALIGN_CHUNK, align

    g = torch.Generator().manual_seed(T)
    idx = torch.randint(0, E, (T, K), generator=g)
    idx[torch.rand(T, K, generator=g) < 0.1] = E + 3
    idx[0, 0] = -1
    assert (T * K > ALIGN_CHUNK) == (T == 130)
    got, want = align(idx.to(DEV), E, bm), reference.align(idx, E, bm)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


MOE_CASES = [(2, 16, "mul1", False, F.silu), (3, 12, "mcg", True, F.silu), (4, 16, "mcg", False, F.silu),
             (2, 8, "3inst", False, F.gelu)]


@pytest.mark.parametrize("bits,L,code,rot,act", MOE_CASES)
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("decode", ["gather", "runs"])
def test_qmoe_matches_reference(bits, L, code, rot, act, tokens, decode):
    """Odd token counts, an expert with no tokens, an out-of-range slot, padded I and H."""
    from ccq.kernels.moe import qmoe

    E, H, inter, K = 4, 40, 24, 2
    g = torch.Generator().manual_seed(tokens)
    gate_up = random_qt((E, 2 * inter, H), bits, L, code, rot, seed=1)
    down = random_qt((E, H, inter), bits, L, code, rot, seed=2)
    x = torch.randn(tokens, H, generator=g).to(DEV)
    idx = torch.tensor([0, 2, 3, 0, 2, 3, 3, 0, 2, 0, 0, 3, 2, 2])[: tokens * K].view(tokens, K)
    idx[-1, -1] = E  # skipped slot; expert 1 never chosen
    idx = idx.to(DEV)
    w = torch.rand(tokens, K, generator=g).to(DEV)
    got = qmoe(x, idx, w, gate_up, down, act, decode=decode)
    assert got.shape == (tokens, H)
    close(got, reference.qmoe(x, idx, w, gate_up, down, act), 1e-5)


def test_qmoe_fp16_and_no_tokens():
    gate_up = random_qt((3, 32, 32), 2, 16, "mul1", False, seed=3)
    down = random_qt((3, 32, 16), 2, 16, "mul1", False, seed=4)
    x = torch.randn(5, 32, device=DEV).half()
    idx = torch.tensor([[0, 2], [2, 0], [0, 0], [2, 2], [0, 2]], device=DEV)
    w = torch.rand(5, 2, device=DEV)
    got = kernels.qmoe(x, idx, w, gate_up, down)
    assert got.dtype == torch.float16
    close(got, reference.qmoe(x.float(), idx, w, gate_up, down), 2e-2)
    empty = kernels.qmoe(x[:0], idx[:0], w[:0], gate_up, down)
    assert empty.shape == (0, 32)


@pytest.mark.parametrize("rows,dtype", [(1, torch.float32), (4, torch.bfloat16)])
def test_qlinear_gemv_fused_epilogue_with_split_k(monkeypatch, rows, dtype):
    """Batch <= 4, K split over programs (grids sized for 132 SMs): the input transform zeroes the partial
    sums and tickets, the last program per output block adds the bias and casts."""
    from ccq.kernels import gemm

    monkeypatch.setattr(gemm, "sm_count", lambda device: 132)
    qt = random_qt((40, 1000), 2, 16, "mul1", False, seed=6)  # in_pad 1008: 63 tiles
    assert gemm.gemv_split(torch.device(DEV), 2, 63) == 2
    x = torch.randn(rows, 1000, device=DEV).to(dtype)
    bias = torch.randn(40, device=DEV).to(dtype)
    got = gemm.qlinear(x, qt, bias)
    assert got.shape == (rows, 40) and got.dtype == dtype
    close(got, reference.qlinear(x.float(), qt, bias.float()), 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("rows,dtype", [(20, torch.float32), (70, torch.bfloat16)])
def test_qlinear_gemm_fused_epilogue_with_split_k(monkeypatch, rows, dtype):
    """More rows, two launches: the input transform zeroes the GEMM's sum, block experts and tickets; K split
    in 4 slices (grids sized for 132 SMs), 1 or 2 row blocks; the last program per output block adds the bias
    and casts (70 rows: in two steps of 64)."""
    from ccq.kernels import gemm, launch

    monkeypatch.setattr(gemm, "sm_count", lambda device: 132)
    qt = random_qt((72, 1000), 3, 16, "mul1", False, seed=9)  # in_pad 1008, out 72: two 64-output blocks
    assert gemm._gemm_shape(rows, 80, 1008, torch.device(DEV))[1] == 4
    x = torch.randn(rows, 1000, device=DEV).to(dtype)
    bias = torch.randn(72, device=DEV).to(dtype)
    xm, qm, bm = x.to("meta"), qt.to("meta"), bias.to("meta")
    with launch.record() as recs:
        n_torch = launch.torch_kernels(lambda: gemm.qlinear(xm, qm, bm))
    assert [r.name for r in recs] == ["_hadamard_kernel", "_gemm_kernel"] and n_torch == 0
    got = gemm.qlinear(x, qt, bias)
    assert got.shape == (rows, 72) and got.dtype == dtype
    close(got, reference.qlinear(x.float(), qt, bias.float()), 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("tokens,inter,had", [(1, 1024, 512), (2, 576, 64)])
def test_qmoe_gemv_fused_transform_and_cast(monkeypatch, tokens, inter, had):
    """The decode-step MoE with down's Hadamard block spanning several launch-1 programs (16 or 2; their
    last one transforms it) and down split over K (tickets count slots x K slices); a skipped slot; bf16 out."""
    from ccq.kernels import gemm
    from ccq.kernels.moe import qmoe

    monkeypatch.setattr(gemm, "sm_count", lambda device: 132)
    E, H, K = 4, 40, 2
    gate_up = random_qt((E, 2 * inter, H), 2, 16, "mcg", False, seed=7)
    down = random_qt((E, H, inter), 2, 16, "mcg", False, seed=8)
    assert down.had_in == had and gemm.gemv_split(torch.device(DEV), tokens * K * 3, inter // 16) == 2
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g).to(DEV).to(torch.bfloat16)
    idx = torch.tensor([3, 1, 0, 3, 2, 2])[: tokens * K].view(tokens, K)
    idx[-1, 0] = E + 5  # skipped slot
    idx = idx.to(DEV)
    w = torch.rand(tokens, K, generator=g).to(DEV)
    got = qmoe(x, idx, w, gate_up, down)
    assert got.shape == (tokens, H) and got.dtype == torch.bfloat16
    close(got, reference.qmoe(x.float(), idx, w, gate_up, down), 1e-2)


def routing(tokens, E, H, K, dtype, every):
    """Inputs x, top-K experts and weights for `tokens`: expert E - 1 never chosen, every `every`-th token's second
    slot out of range (skipped)."""
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g).to(DEV).to(dtype)
    idx = torch.randint(0, E - 1, (tokens, K), generator=g)
    idx[::every, 1] = E + 1
    return x, idx.to(DEV), torch.rand(tokens, K, generator=g).to(DEV)


@pytest.mark.parametrize("tokens,rot,dtype", [(70, False, torch.bfloat16), (33, True, torch.float16)])
def test_qmoe_gemm_weighted_sum_and_cast(tokens, rot, dtype):
    """The prefill MoE: down adds routing weight * row into the zeroed fp32 sum by atomics, the last program per
    output block casts (70 tokens: two 64-row steps); a rotated down output side takes the unfused cast.
    Skipped slots, an expert with no tokens, a top-3 routing; 64-row blocks from 32 pairs per expert (70
    tokens: 42), else 16 (33 tokens: 20)."""
    from ccq.kernels import launch
    from ccq.kernels.moe import qmoe

    E, H, inter, K = 5, 40, 24, 3
    gate_up = random_qt((E, 2 * inter, H), 2, 16, "mul1", False, seed=9)
    down = random_qt((E, H, inter), 2, 16, "mul1", rot, seed=10)
    x, idx, w = routing(tokens, E, H, K, dtype, every=7)
    with launch.record() as recs:
        qmoe(x, idx, w, gate_up, down)
    assert {r.kwargs["BM"] for r in recs if r.name == "_gemm_kernel"} == {64 if tokens * K >= 32 * E else 16}
    got = qmoe(x, idx, w, gate_up, down)
    assert got.shape == (tokens, H) and got.dtype == dtype
    close(got, reference.qmoe(x.float(), idx, w, gate_up, down), 1e-5 if dtype == torch.float32 else 1e-2)


def test_qmoe_gemm_fused_transform(monkeypatch, inter=1024, had=512):
    """The prefill MoE with down's Hadamard block spanning 16 launch-1 programs (32 outputs each; 2 in the
    7-token tests): their last one writes down's input transform (tickets per row block and Hadamard block)."""
    from ccq.kernels import gemm, moe

    calls, transform = [], moe.transform
    monkeypatch.setattr(moe, "transform", lambda *a, **k: calls.append(a[2]) or transform(*a, **k))
    E, H, K, tokens = 3, 40, 2, 5
    gate_up = random_qt((E, 2 * inter, H), 2, 16, "mul1", False, seed=11)
    down = random_qt((E, H, inter), 2, 16, "mul1", False, seed=12)
    assert down.had_in == had and gemm.gemm_bn(inter, inter) == 32
    g = torch.Generator().manual_seed(inter)
    x = torch.randn(tokens, H, generator=g).to(DEV)
    idx = torch.tensor([[0, 2], [2, 2], [0, 5], [2, 0], [0, 0]], device=DEV)
    w = torch.rand(tokens, K, generator=g).to(DEV)
    got = moe.qmoe(x, idx, w, gate_up, down)
    assert calls == [gate_up.had_in]  # down's input transform ran inside launch 1
    close(got, reference.qmoe(x, idx, w, gate_up, down), 1e-5)


@pytest.mark.parametrize("bits,code", [(2, "mcg"), (3, "1mad"), (4, "mul1")])
def test_gemv_split_k_atomics(bits, code):
    """The K-split GEMV (fp32 atomics into a zeroed output) sums to the unsplit result."""
    from ccq.kernels.gemm import gemv

    qt = random_qt((24, 400), bits, 16, code, False, seed=bits)  # 25 tiles: 4 steps of 8, last one partial
    xr = torch.randn(2, 400, device=DEV)
    want = xr @ qt.rotated_weight().T
    for split in (1, 3, 8):
        close(gemv(xr, qt, split_k=split), want, 1e-5)


def test_gemm_block_rows_by_gpu(monkeypatch):
    """Dense GEMM blocks of 64 rows from 33 rows up, but of 32 on a GPU before sm_90 (where 64 spill)."""
    from ccq.kernels import gemm

    cuda = torch.device("cuda")
    assert gemm._gemm_shape(72, 2560, 1536, torch.device("meta"), split_k=1) == (64, 1)
    for cap, bm in (((9, 0), 64), ((8, 0), 32), ((8, 9), 32)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=cap: c)
        assert gemm._gemm_shape(72, 2560, 1536, cuda, split_k=1) == (bm, 1)
        assert gemm._gemm_shape(20, 2560, 1536, cuda, split_k=1) == (32, 1)


@pytest.mark.parametrize("decode", ["runs", "gather"])
def test_gemm_split_k_atomics(decode):
    """The K-split GEMM (fp32 atomics into a zeroed output) sums to the unsplit result."""
    from ccq.kernels.gemm import matmul

    qt = random_qt((40, 800), 3, 16, "mcg", False, seed=4)  # 50 tiles: 4 runs-steps of 256, the last partial
    xr = torch.randn(20, 800, device=DEV)
    want = xr @ qt.rotated_weight().T
    for split in (1, 2, 4):
        close(matmul(xr, qt, decode=decode, split_k=split), want, 1e-5)


def test_gemm_decode_name_checked():
    from ccq.kernels.gemm import qlinear

    qt = random_qt((24, 48), 2, 16, "mul1", False)
    with pytest.raises(ValueError, match="decode must be 'gather' or 'runs', got 'lut'"):
        qlinear(torch.randn(8, 48, device=DEV), qt, decode="lut")


# the tensor-core GEMV (Gluon on a GPU, its layout-erased twin here): every bit width and code kind, small L
TC_CASES = [(2, 16, "mul1"), (2, 12, "mcg"), (3, 16, "1mad"), (3, 10, "mcg"), (4, 16, "3inst"), (4, 8, "mul1")]


@pytest.mark.parametrize("bits,L,code", TC_CASES)
@pytest.mark.parametrize("rows,inp", [(1, 250), (8, 250), (3, 128), (13, 250), (29, 250), (45, 250)])
def test_qlinear_tensor_core_gemv(monkeypatch, bits, L, code, rows, inp):
    """Batch <= 64 (8, 16 or 32 MMA columns; 45 rows: two blocks of 32 rows, direct stores) with Hadamard
    blocks >= 128 runs the tensor-core GEMV: in 250
    (in_pad 256: two K steps, split over two programs with the ticket epilogue) or 128 (one step, direct
    store); out 200 (two output blocks of 128, the second one partly past the output), bias, fp16
    activations scaled per (row, block)."""
    from ccq.kernels import gemm, gemv_tc

    calls = []
    monkeypatch.setattr(gemv_tc, "qlinear_tc", lambda *a, f=gemv_tc.qlinear_tc: calls.append(1) or f(*a))
    qt = random_qt((200, inp), bits, L, code, False, seed=bits + L, hadamard_block=128)
    x = torch.randn(rows, inp, device=DEV) * torch.logspace(-2, 4, rows, device=DEV)[:, None]  # beyond fp16
    bias = torch.randn(200, device=DEV)
    got = gemm.qlinear(x, qt, bias)
    assert calls and got.shape == (rows, 200)
    want = reference.qlinear(x, qt, bias)
    for r in range(rows):  # each row against its own scale: fp16 activations, about 2**-11 relative
        close(got[r], want[r], 2e-3)


@pytest.mark.parametrize("bits,code", [(2, "mul1"), (2, "3inst"), (3, "mcg"), (4, "3inst")])
def test_qlinear_tensor_core_two_steps_per_iteration(monkeypatch, bits, code):
    """Hadamard blocks of 256 (16 tiles): each loop iteration takes two K steps under one activation scale;
    in 768 (48 tiles: three blocks of different scales) split over three programs of one iteration each
    (sm_count 2: about 8 programs wanted)."""
    from ccq.kernels import gemm, gemv_tc

    monkeypatch.setattr(gemv_tc, "sm_count", lambda device: 2)
    qt = random_qt((40, 768), bits, 16, code, False, seed=bits, hadamard_block=256)
    assert gemv_tc.steps_per_iteration(qt) == 2 and gemv_tc.split_for(DEV, 1, 48, 2) == (3, 16)
    x = torch.randn(2, 768, device=DEV) * torch.tensor([[1e-3], [1e4]], device=DEV)
    x[:, 256:512] *= 50  # the middle block's scale differs from its neighbours'
    got, want = gemm.qlinear(x, qt), reference.qlinear(x, qt)
    for r in range(2):
        close(got[r], want[r], 2e-3)


@pytest.mark.parametrize("bits,code,rows", [(2, "mul1", 24), (3, "mcg", 24), (4, "3inst", 24), (2, "mcg", 40)])
def test_qlinear_tensor_core_32_columns(monkeypatch, bits, code, rows):
    """17-64 rows: 32 MMA columns, B loaded per weight, the sum rescaled from block to block (powers of two),
    four K steps per iteration under a 512-block's scale; in 3072 (six blocks of different scales) split
    over three programs of two blocks each (sm_count 1; 40 rows: two row blocks, two programs of three),
    with the ticket epilogue (40 rows: tickets from both row blocks, the cast in two steps) and a bias."""
    from ccq.kernels import gemm, gemv_tc

    monkeypatch.setattr(gemv_tc, "sm_count", lambda device: 1)
    qt = random_qt((40, 3072), bits, 16, code, False, seed=bits, hadamard_block=512)
    assert gemv_tc.steps_per_iteration(qt, 32) == 4 and gemv_tc.split_for(DEV, 1, 192, 4) == (3, 64)
    assert gemv_tc.split_for(DEV, 2, 192, 4) == (2, 96)
    x = torch.randn(rows, 3072, device=DEV) * torch.logspace(-3, 4, rows, device=DEV)[:, None]
    x[:, 512:1024] *= 50  # neighbouring blocks of different scales in each program
    x[:, 2048:2560] *= 1e-3
    x[3, 1024:1536] *= 1e-6
    bias = torch.randn(40, device=DEV)
    got, want = gemm.qlinear(x, qt, bias), reference.qlinear(x, qt, bias)
    for r in range(rows):
        close(got[r], want[r], 2e-3)


def test_qlinear_tensor_core_one_launch_clears_its_sum(monkeypatch):
    """Up to 8 rows: one launch. Each program transforms the Hadamard blocks its K slice touches (in 1536 =
    three 512-blocks over two slices of 768: the middle block is shared), and the K-split sum kept with the
    weight is zero again after every call, so a second call with other rows (and a third with fewer) is exact.
    Past the prologues' budget of transformed values: the transform launch and the GEMV."""
    from ccq.kernels import gemm, gemv_tc, hadamard

    launched = []
    for mod in (gemv_tc, hadamard):
        monkeypatch.setattr(mod, "launch", lambda k, *a, f=mod.launch, **kw: launched.append(k) or f(k, *a, **kw))
    monkeypatch.setattr(gemv_tc, "sm_count", lambda device: 1)
    qt = random_qt((200, 1536), 2, 16, "mul1", False, seed=3, hadamard_block=512)
    assert gemv_tc.split_for(DEV, 2, 96, 2) == (2, 48)
    bias = torch.randn(200, device=DEV)
    for rows, seed in ((3, 0), (8, 1), (1, 2)):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, 1536, generator=g).to(DEV) * torch.logspace(-2, 3, rows, device=DEV)[:, None]
        x[:, 512:1024] *= 30
        launched.clear()
        got = gemm.qlinear(x, qt, bias)
        assert launched == [gemv_tc._KERNEL]
        want = reference.qlinear(x, qt, bias)
        for r in range(rows):
            close(got[r], want[r], 2e-3)
        assert not gemv_tc._SUMS[qt.trellis].any()
    xb = torch.randn(2, 1536, device=DEV).to(torch.bfloat16)  # bf16 rows in, bf16 out
    launched.clear()
    got = gemm.qlinear(xb, qt, bias)
    assert got.dtype == torch.bfloat16 and launched == [gemv_tc._KERNEL]
    close(got.float(), reference.qlinear(xb.float(), qt, bias), 1e-2)
    # 2 programs x 2 slices touching 2 blocks each x 512: past the budget, two launches (transform, GEMV)
    assert gemv_tc.prologue_elements(1, 2, 96, 48, 512) == 4096
    assert gemv_tc.one_launch(x, qt)
    monkeypatch.setattr(gemv_tc, "FUSED_MAX_ELEMENTS", 4095)
    assert not gemv_tc.one_launch(x, qt)
    launched.clear()
    close(gemm.qlinear(x, qt, bias)[0], reference.qlinear(x, qt, bias)[0], 2e-3)
    assert launched == [hadamard._hadamard_kernel, gemv_tc._KERNEL]


def test_qlinear_tensor_core_gemv_dispatch(monkeypatch):
    """More than 64 rows (MoE: 8 tokens), Hadamard blocks below 128 or a rotated output side take the other
    kernels."""
    from ccq.kernels import gemv_tc

    x = torch.randn(1, 250, device=DEV)
    assert gemv_tc.supported(x, random_qt((40, 250), 2, hadamard_block=128))
    assert gemv_tc.supported(torch.randn(64, 250, device=DEV), random_qt((40, 250), 2, hadamard_block=128))
    assert not gemv_tc.supported(torch.randn(65, 250, device=DEV), random_qt((40, 250), 2, hadamard_block=128))
    gu, dn = random_qt((4, 256, 128), 2, hadamard_block=128), random_qt((4, 128, 128), 2, hadamard_block=128)
    assert gemv_tc.moe_supported(torch.randn(8, 128, device=DEV), gu, dn, F.silu)
    assert not gemv_tc.moe_supported(torch.randn(9, 128, device=DEV), gu, dn, F.silu)
    assert not gemv_tc.moe_supported(torch.randn(1, 128, device=DEV), gu, dn, F.gelu)
    odd = random_qt((4, 242, 128), 2, hadamard_block=128), random_qt((4, 128, 121), 2, hadamard_block=128)
    assert not gemv_tc.moe_supported(torch.randn(1, 128, device=DEV), *odd, F.silu)  # up rows start mid-pair
    assert not gemv_tc.supported(x, random_qt((40, 250), 2, hadamard_block=64))
    assert not gemv_tc.supported(x, random_qt((40, 250), 2, hadamard_block=128, rotate_output=True))


@pytest.mark.parametrize("sms", [1, 64])
def test_hadamard_rows_per_program_and_zeroing(monkeypatch, sms):
    """20 rows in two 128-blocks: 16 rows per program on one SM; with 64 SMs one row per program (40
    programs), so the zeroed buffer is cut into more, smaller chunks: still all of it zeroed, same values."""
    from ccq.kernels import hadamard

    monkeypatch.setattr(hadamard, "sm_count", lambda device: sms)
    grids = []
    monkeypatch.setattr(hadamard, "launch",
                        lambda k, g, *a, f=hadamard.launch, **kw: grids.append(g) or f(k, g, *a, **kw))
    s = random_signs(256, 5).to(DEV)
    x = torch.randn(20, 250, device=DEV)
    buf = torch.randn(1000, device=DEV)
    got = hadamard.transform(x, s, 128, zero=buf)
    assert grids == [(2, 2) if sms == 1 else (20, 2)]
    close(got, transform_activations(F.pad(x, (0, 6)), s, 128), 1e-5)
    assert not buf.any()


def test_hadamard_pairs_scaled_fp16():
    """transform_pairs: each value twice as fp16 at its `pair_index` (per 128 columns: 256 * step + 64 * (tile
    % 4) + 4 * c + 2 * (tile // 4)), divided per (row, block) by a power of two that puts the block's largest
    magnitude in [2**14, 2**15); zero blocks get scale 1."""
    from ccq.kernels.hadamard import transform, transform_pairs

    s = random_signs(512, 4).to(DEV)
    x = torch.randn(3, 500, device=DEV) * torch.tensor([[1e-6], [1.0], [3e5]], device=DEV)
    x[0, :128] = 0
    xd, xs = transform_pairs(x, s, 128)
    assert xd.shape == (3, 1024) and xd.dtype == torch.float16 and xs.shape == (3, 4)
    k = torch.arange(512, device=DEV)
    tile = k % 128 // 16
    dest = k // 128 * 256 + tile % 4 * 64 + k % 16 * 4 + tile // 4 * 2
    assert torch.equal(torch.sort(dest).values, torch.arange(0, 1024, 2, device=DEV))  # every slot once
    pairs = torch.stack([xd.float()[:, dest], xd.float()[:, dest + 1]], -1)
    assert torch.equal(pairs[..., 0], pairs[..., 1])
    assert torch.equal(xs, torch.exp2(torch.log2(xs).round()))  # powers of two
    assert xs[0, 0] == 1 and (pairs[0, :128] == 0).all()
    peak = pairs[..., 0].abs().view(3, 4, 128).amax(-1)
    assert ((peak[:, 1:] >= 2 ** 14) & (peak[:, 1:] < 2 ** 15)).all() and (peak[1:, 0] >= 2 ** 14).all()
    want = transform(x, s, 128)
    got = (pairs[..., 0].view(3, 4, 128) * xs[..., None]).view(3, 512)
    close(got, want, 1e-3)


@pytest.mark.parametrize("bits,code,inter,dtype,tokens", [(2, "mul1", 250, torch.bfloat16, 13),
                                                            (3, "mcg", 120, torch.float32, 13),
                                                            (4, "3inst", 250, torch.float32, 13),
                                                            (2, "mcg", 120, torch.float32, 40)])
def test_qmoe_tensor_core_sorted_pairs(monkeypatch, bits, code, inter, dtype, tokens):
    """More than 8 tokens: pairs sorted by expert in blocks (`align`), one MMA column per pair. 13 tokens, top-2
    over 4 experts (blocks of 8): expert 3 has 11 pairs (two blocks), expert 1 none, a skipped slot; 40 tokens
    (20 pairs per expert: blocks of 16, 16 MMA columns): the same routing repeated. Launch 1's last programs
    transform each pair of a block; down split over K with atomics per column and tickets counting the
    unused blocks."""
    from ccq.kernels import gemv_tc, moe

    monkeypatch.setattr(gemv_tc, "sm_count", lambda device: 132)
    E, H, K = 4, 120, 2
    gate_up, down = moe_pair(E, H, inter, bits, code, seed=15)
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(tokens, H, generator=g) * 100).to(DEV).to(dtype)
    idx = torch.tensor([[3, 0]] * 5 + [[2, 3]] * 6 + [[0, 2], [E + 5, 3]]).repeat(4, 1)[:tokens].to(DEV)
    w = torch.rand(tokens, K, generator=g).to(DEV)
    assert gemv_tc.moe_sorted_supported(x, idx, gate_up, down, F.silu)
    assert gemv_tc.sorted_block(idx, E) == (8 if tokens == 13 else 16)
    calls = []
    monkeypatch.setattr(gemv_tc, "qmoe_tc", lambda *a, f=gemv_tc.qmoe_tc: calls.append(len(a) == 6) or f(*a))
    got = moe.qmoe(x, idx, w, gate_up, down)
    assert calls == [True] and got.shape == (tokens, H) and got.dtype == dtype
    close(got, reference.qmoe(x.float(), idx, w, gate_up, down), 3e-3 if dtype == torch.float32 else 1e-2)
    many = idx[:1].repeat(160, 1)  # 160 tokens: 80 pairs per expert on average, past SORTED_MAX_PAIRS: the GEMM
    assert not gemv_tc.moe_sorted_supported(torch.randn(160, H, device=DEV), many, gate_up, down, F.silu)


@pytest.mark.parametrize("bits,code,tokens,inter,dtype", [(2, "mul1", 1, 250, torch.bfloat16),
                                                          (3, "mcg", 3, 120, torch.float32),
                                                          (4, "3inst", 2, 120, torch.float32)])
def test_qmoe_tensor_core_decode_step(monkeypatch, bits, code, tokens, inter, dtype):
    """The tensor-core decode step (Hadamard blocks >= 128): launch 1's last program per (slot, block)
    writes down's input as scaled fp16 pairs (8 or 4 programs per block; padded intermediate 250 -> 256,
    120 -> 128), down split over K at 250 (tickets: slots x slices), a skipped slot, padded hidden 120."""
    from ccq.kernels import gemv_tc, moe

    monkeypatch.setattr(gemv_tc, "sm_count", lambda device: 132)
    E, H, K = 4, 120, 2
    gate_up, down = moe_pair(E, H, inter, bits, code, seed=13)
    g = torch.Generator().manual_seed(tokens)
    x = (torch.randn(tokens, H, generator=g) * 100).to(DEV).to(dtype)
    assert gemv_tc.moe_supported(x, gate_up, down, F.silu)
    idx = torch.tensor([3, 1, 0, 3, 2, 2])[: tokens * K].view(tokens, K)
    idx[-1, 0] = E + 5  # skipped slot
    idx = idx.to(DEV)
    w = torch.rand(tokens, K, generator=g).to(DEV)
    calls = []
    monkeypatch.setattr(gemv_tc, "qmoe_tc", lambda *a, f=gemv_tc.qmoe_tc: calls.append(1) or f(*a))
    got = moe.qmoe(x, idx, w, gate_up, down)
    assert calls and got.shape == (tokens, H) and got.dtype == dtype
    close(got, reference.qmoe(x.float(), idx, w, gate_up, down), 3e-3 if dtype == torch.float32 else 1e-2)
