"""Fused trellis-decode GEMV / GEMM: y = x' @ W'^T without materialising W'.

Two kernels share the decode of `decode.py` (window offsets computed once, outside the K loop):
- `_gemv_kernel` (a few rows, batch-1 decode): CUDA-core FMAs, the K loop split over a second
  grid axis (fp32 atomics) so that even a short output dim fills the GPU.
- `_gemm_kernel` (everything else, and the MoE): tensor-core `tl.dot` on blocks of BM rows. A
  block may gather its input rows (tokens sorted by expert), take its weights from one expert
  of a stack, fuse SwiGLU over the [gate | up] rows, and scatter its output rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, sm_count
from .decode import code_norm, code_params, decode_at, decode_runs, run_offsets, window_offsets

GEMV_MAX_ROWS = 4
# "gather": two 16-bit loads per weight (L1-served); "runs": one load per word of each tile-row run,
# windows cut from a 64-bit string. Both are exact; which is faster is for a GPU to tell (bench).
DECODE = "gather"
_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _gemv_kernel(x_ptr, x_stride, tr_ptr, sc_ptr, y_ptr, y_stride, M, N, K, KT, K_PER_SPLIT, NORM,
                 BITS: tl.constexpr, L: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
                 FP16SUM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 ATOMIC: tl.constexpr, RUNS: tl.constexpr):
    pid_n = tl.program_id(0)
    k_lo = tl.program_id(1) * K_PER_SPLIT
    rows = pid_n * BN + tl.arange(0, BN)
    m = tl.arange(0, BM)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if RUNS:
        offs = run_offsets(rows, KT, BK // 16, BITS)
    else:
        off0, off1, shift = window_offsets(rows[:, None], tl.arange(0, BK)[None, :], KT, BITS, L)
    for k0 in range(k_lo, k_lo + K_PER_SPLIT, BK):
        cols = k0 + tl.arange(0, BK)
        kmask = cols < K
        tr = tr_ptr + (k0 // 16) * (16 * BITS)
        if RUNS:
            tmask = (rows < N)[:, None, None] & ((k0 // 16 + tl.arange(0, BK // 16)) < KT)[None, :, None]
            w = decode_runs(tr, offs, tmask, BITS, L, MUL, ADD, FP16SUM)
        else:
            w = decode_at(tr, off0, off1, shift, (rows[:, None] < N) & kmask[None, :], L, MUL, ADD, FP16SUM)
        x = tl.load(x_ptr + m[:, None] * x_stride + cols[None, :], mask=(m[:, None] < M) & kmask[None, :],
                    other=0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    sc = tl.load(sc_ptr + rows, mask=rows < N, other=0).to(tl.float32) * NORM
    y = acc * sc[None, :]
    ptrs = y_ptr + m[:, None] * y_stride + rows[None, :]
    ymask = (m[:, None] < M) & (rows[None, :] < N)
    if ATOMIC:
        tl.atomic_add(ptrs, y, mask=ymask)
    else:
        tl.store(ptrs, y, mask=ymask)


@triton.jit
def _gemm_kernel(a_ptr, a_stride, ids_ptr, expert_ids_ptr, tr_ptr, tr_estride, sc_ptr, sc_estride,
                 y_ptr, y_stride, M, N, K, KT, TOP_K, GATE_OFF, NORM,
                 BITS: tl.constexpr, L: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
                 FP16SUM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 ROUTED: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_Y: tl.constexpr,
                 SWIGLU: tl.constexpr, DOT: tl.constexpr, RUNS: tl.constexpr):
    """Row r of block pid_m: without ROUTED, row r of A and y. With ROUTED, ids[r] is a flat
    (token, slot) index (>= M marks padding): A row ids[r] // TOP_K when GATHER_A, else r;
    y row ids[r] when SCATTER_Y, else r. SWIGLU: y[:, n] = silu(W'[n] x) * (W'[GATE_OFF + n] x)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if e < 0:  # past the last used block
        return
    r = pid_m * BM + tl.arange(0, BM)
    if ROUTED:
        ids = tl.load(ids_ptr + r)
        valid = ids < M
        a_rows = r
        y_rows = r
        if GATHER_A:
            a_rows = ids // TOP_K
        if SCATTER_Y:
            y_rows = ids
    else:
        valid = r < M
        a_rows = r
        y_rows = r
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    tr = tr_ptr + e * tr_estride
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if RUNS:
        offs = run_offsets(n, KT, BK // 16, BITS)
        up_offs = run_offsets(GATE_OFF + n, KT, BK // 16, BITS)
    else:
        off0, off1, shift = window_offsets(n[None, :], tl.arange(0, BK)[:, None], KT, BITS, L)
        up0, up1, up_shift = window_offsets(GATE_OFF + n[None, :], tl.arange(0, BK)[:, None], KT, BITS, L)
    if SWIGLU:
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        kmask = cols < K
        a = tl.load(a_ptr + a_rows.to(tl.int64)[:, None] * a_stride + cols[None, :],
                    mask=valid[:, None] & kmask[None, :], other=0).to(DOT)
        wmask = kmask[:, None] & nmask[None, :]
        tr_k = tr + (k0 // 16) * (16 * BITS)
        if RUNS:
            tmask = nmask[:, None, None] & ((k0 // 16 + tl.arange(0, BK // 16)) < KT)[None, :, None]
            w = tl.trans(decode_runs(tr_k, offs, tmask, BITS, L, MUL, ADD, FP16SUM))
        else:
            w = decode_at(tr_k, off0, off1, shift, wmask, L, MUL, ADD, FP16SUM)
        acc = tl.dot(a, w.to(DOT), acc)
        if SWIGLU:
            if RUNS:
                wu = tl.trans(decode_runs(tr_k, up_offs, tmask, BITS, L, MUL, ADD, FP16SUM))
            else:
                wu = decode_at(tr_k, up0, up1, up_shift, wmask, L, MUL, ADD, FP16SUM)
            acc_up = tl.dot(a, wu.to(DOT), acc_up)
    sc_base = sc_ptr + e * sc_estride
    y = acc * (tl.load(sc_base + n, mask=nmask, other=0).to(tl.float32) * NORM)[None, :]
    if SWIGLU:
        up = acc_up * (tl.load(sc_base + GATE_OFF + n, mask=nmask, other=0).to(tl.float32) * NORM)[None, :]
        y = y / (1 + tl.exp(-y)) * up
    tl.store(y_ptr + y_rows.to(tl.int64)[:, None] * y_stride + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & nmask[None, :])


def _runs(decode: str | None) -> bool:
    """RUNS flag of the kernels for a decode name (None: the default, `DECODE`)."""
    decode = decode or DECODE
    if decode not in ("gather", "runs"):
        raise ValueError(f"decode must be 'gather' or 'runs', got {decode!r}")
    return decode == "runs"


def dot_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Tensor-core operand type for activations of `dtype` (fp32 runs as tf32 on GPUs).

    Triton's CPU interpreter computes bf16 `tl.dot` on the raw bits, so there bf16 runs as fp32.
    """
    if dtype == torch.bfloat16 and device.type != "cuda":
        return torch.float32
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def gemv(xr: torch.Tensor, qt, split_k: int | None = None, decode: str | None = None) -> torch.Tensor:
    """y [M, out_pad] fp32 = xr [M, in_pad] @ W'^T for M <= GEMV_MAX_ROWS (2-D qt).

    split_k: K slices summed with atomics; by default enough for ~8 programs per SM.
    """
    M, K = xr.shape
    ot, KT = qt.trellis.shape[0], qt.trellis.shape[1]
    N = ot * 16
    BN, BK = 16, 128
    n_blocks = triton.cdiv(N, BN)
    k_blocks = triton.cdiv(K, BK)
    if split_k is None:
        split_k = sm_count(xr.device) * 8 // n_blocks
    split = max(1, min(k_blocks, split_k))
    k_per = triton.cdiv(k_blocks, split) * BK
    split = triton.cdiv(K, k_per)
    y = (torch.zeros if split > 1 else torch.empty)(M, N, dtype=torch.float32, device=xr.device)
    launch(_gemv_kernel, (n_blocks, split), xr, xr.stride(0), qt.trellis, qt.scales, y, N, M, N, K, KT, k_per,
                                    code_norm(qt), BM=triton.next_power_of_2(M), BN=BN, BK=BK,
                                    ATOMIC=split > 1, RUNS=_runs(decode), **code_params(qt))
    return y


def gemm(a: torch.Tensor, tr: torch.Tensor, scales: torch.Tensor, qt, *, n_out: int, out: torch.Tensor,
         block_m: int, expert_ids: torch.Tensor, ids: torch.Tensor | None = None, n_valid: int | None = None,
         top_k: int = 1, gather_a: bool = False, scatter_y: bool = False, gate_off: int = 0,
         decode: str | None = None) -> torch.Tensor:
    """Launch `_gemm_kernel`: out[rows, :n_out] = (a @ W'^T)[rows] (or SwiGLU of it when gate_off > 0).

    tr/scales: [E, out/16, in/16, 16*bits] / [E, out] (a 2-D weight is a stack of one);
    expert_ids: the expert of each block of block_m rows (-1: skip); ids: flat routed indices.
    """
    K = a.shape[1]
    KT = tr.shape[-2]
    BN = 64 if n_out >= 64 else 32 if n_out >= 32 else 16
    BK = 64 if K >= 64 else 32 if K >= 32 else 16
    grid = (expert_ids.shape[0], triton.cdiv(n_out, BN))
    routed = ids is not None
    launch(_gemm_kernel, grid, a, a.stride(0), ids if routed else expert_ids, expert_ids, tr, tr[0].numel(), scales,
                       scales[0].numel(), out, out.stride(0), n_valid if routed else a.shape[0], n_out, K, KT,
                       top_k, gate_off, code_norm(qt), BM=block_m, BN=BN, BK=BK, ROUTED=routed, GATHER_A=gather_a,
                       SCATTER_Y=scatter_y, SWIGLU=gate_off > 0, DOT=_DOT_DTYPES[a.dtype],
                       RUNS=_runs(decode), **code_params(qt))
    return out


def matmul(xr: torch.Tensor, qt, decode: str | None = None) -> torch.Tensor:
    """y [M, out_pad] fp32 = xr [M, in_pad] @ W'^T for a 2-D quantized weight."""
    M = xr.shape[0]
    if M == 0:
        return torch.zeros(0, qt.trellis.shape[0] * 16, dtype=torch.float32, device=xr.device)
    if M <= GEMV_MAX_ROWS:
        return gemv(xr.float().contiguous(), qt, decode=decode)
    N = qt.trellis.shape[0] * 16
    BM = 16 if M <= 16 else 32 if M <= 32 else 64
    expert_ids = torch.zeros(triton.cdiv(M, BM), dtype=torch.int32, device=xr.device)
    y = torch.empty(M, N, dtype=torch.float32, device=xr.device)
    return gemm(xr.contiguous(), qt.trellis[None], qt.scales[None], qt, n_out=N, out=y, block_m=BM,
                expert_ids=expert_ids, decode=decode)


def qlinear(x: torch.Tensor, qt, bias: torch.Tensor | None = None, decode: str | None = None) -> torch.Tensor:
    """Triton twin of `reference.qlinear`: rotate x, fused decode-matmul, unrotate y."""
    from .hadamard import transform

    lead, out_f = x.shape[:-1], qt.shape[-2]
    x2 = x.reshape(-1, x.shape[-1])
    small = x2.shape[0] <= GEMV_MAX_ROWS
    xr = transform(x2, qt.signs_in, qt.had_in, torch.float32 if small else dot_dtype(x.dtype, x.device))
    y = matmul(xr, qt, decode)
    if qt.signs_out is not None:
        y = transform(y, qt.signs_out, qt.had_out, sign_after=True)
    y = y[:, :out_f]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, out_f)
