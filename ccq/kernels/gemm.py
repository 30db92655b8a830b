"""Fused trellis-decode GEMV / GEMM: y = x' @ W'^T without materialising W'.

Two kernels share the decode of `decode.py` (offsets computed once, outside the K loop); a third, the
tensor-core GEMV of `gemv_tc.py`, takes up to 8 rows where it applies (`gemv_tc.supported`):
- `_gemv_kernel` (a few rows: batch-1 decode, and the MoE at up to 4 tokens): CUDA-core FMAs
  accumulated element-wise per run, the K loop split over grid axis 2 (fp32 atomics) so that
  even a short output dim fills the GPU; routed, one program row per (token, slot).
- `_gemm_kernel` (more rows, and the MoE beyond 4 tokens): tensor-core `tl.dot` on blocks of
  BM rows. A block may gather its input rows (tokens sorted by expert), take its weights from
  one expert of a stack, fuse SwiGLU over the [gate | up] rows, and scatter its output rows.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import gemv_tc
from .hadamard import fwht
from .launch import launch, sm_count
from .decode import (code_norm, code_params, code_value, decode_at, rotated_weight, run_history_offsets,
                     run_strings, run_window, window_offsets)

GEMV_MAX_ROWS = 4
# Prefill: from DEQUANT_MIN_ROWS rows and DEQUANT_MIN_MACS multiply-adds on, a dense layer decodes W' once
# to 16 bits and lets cuBLAS multiply. The fused GEMM decodes every weight again for each block of 64 rows
# (12-15 instructions a weight); the other path writes and reads a 16-bit W' once and launches one kernel
# more. With these two bounds bench/sass.py's model picks the faster path on every ERNIE dense shape at 256,
# 1024 and 4096 rows (28B gate_up at 1024 rows: 53 -> 30 us; docs/KERNELS.md "Prefill").
DEQUANT_MIN_ROWS = 256
DEQUANT_MIN_MACS = 1 << 30
# GEMM decode. "runs": each thread decodes whole tile-row runs (compile-time window shifts), 16 dots per
# K step, one per weight of the runs; "gather": two 16-bit loads per weight (L1-served). Both exact;
# sass.py predicts "runs" at about a third of the instructions, the benchmark times both.
DECODE = "runs"
_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _last_to_arrive(counter_ptr, n):
    """Take a ticket at counter_ptr; true for the n-th (last) program to arrive. The barrier and the
    ticket's release order every thread's earlier writes before it; its acquire orders the last
    program's reads after everyone's (cooperative groups' grid sync pattern)."""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == n - 1


@triton.jit
def _finish(y_ptr, y_stride, out_ptr, out_stride, bias_ptr, cnt_ptr, pid_n, TICKETS, N_TOK, N_OUT,
            BN: tl.constexpr, TB: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Ticket of output block pid_n; the TICKETS-th (last) program to arrive writes out[:N_TOK, block] =
    y (+ bias) in out's dtype, after everyone's atomics on y (`_last_to_arrive`). cnt_ptr was zeroed
    by an earlier launch, so no state survives the call (CUDA-graph safe)."""
    if _last_to_arrive(cnt_ptr + pid_n, TICKETS):
        cols = pid_n * BN + tl.arange(0, BN)
        for r0 in range(0, N_TOK, TB):  # TB rows at a time (the GEMV: all of them at once)
            r = (r0 + tl.arange(0, TB)).to(tl.int64)
            mask = (r < N_TOK)[:, None] & (cols < N_OUT)[None, :]
            v = tl.load(y_ptr + r[:, None] * y_stride + cols[None, :], mask=mask, other=0, cache_modifier=".cg")
            if HAS_BIAS:
                v += tl.load(bias_ptr + cols, mask=cols < N_OUT, other=0).to(tl.float32)[None, :]
            tl.store(out_ptr + r[:, None] * out_stride + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, x_stride, expert_ids_ptr, tr_ptr, tr_estride, sc_ptr, sc_estride, y_ptr, y_stride,
                 w_ptr, M, N, KT, T_PER_SPLIT, TOP_K, N_EXPERTS, GATE_OFF, NORM,
                 out_ptr, out_stride, N_OUT, bias_ptr, s_ptr, cnt_ptr, TICKETS, N_TOK, HAD_SCALE,
                 BITS: tl.constexpr, L: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
                 FP16SUM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, J: tl.constexpr,
                 ATOMIC: tl.constexpr, ROUTED: tl.constexpr, GATHER_A: tl.constexpr, SWIGLU: tl.constexpr,
                 FINISH: tl.constexpr, TB: tl.constexpr, HAS_BIAS: tl.constexpr, HAD: tl.constexpr,
                 LOGHAD: tl.constexpr):
    """y[rows, n] = x[rows] . W'[n] on CUDA cores for a few rows, K split over grid axis 2.

    Every run (one tile row: 16 weights along K) is decoded by one thread from a 64-bit string
    of its words with compile-time shifts (`run_window`), and x * w is accumulated element-wise
    per (row, output, tile); the tiles are summed once after the K loop.
    Dense (not ROUTED): rows 0..M-1 of x and y, one expert (expert_ids_ptr unused).
    ROUTED (MoE, BM = 1, no sorting): program pid_m serves flat slot s = pid_m (of M = T*TOP_K) with
    expert e = expert_ids[s] (skipped unless 0 <= e < N_EXPERTS). GATHER_A (launch 1): x row s // TOP_K,
    y row s (with SWIGLU: silu(gate) * up, gate rows n and up rows GATE_OFF + n). Else (launch 2):
    x row s, y row s // TOP_K += routing weight w[s] * result, atomically (the weighted sum fused).
    Fused epilogues (the launches they replace: docs/KERNELS.md, "Launches"):
    FINISH (not GATHER_A): the result goes to out[:N_TOK, :N_OUT] (+ bias) in out's dtype; with ATOMIC
    through the zeroed fp32 y and a ticket per output block (`_finish`, TICKETS programs per block).
    HAD > 0 (GATHER_A): out[s] = HAD_SCALE * H(s_ptr * y[s]) per HAD-block, done by the last of the block's
    HAD // BN programs (ticket per (slot, block) in cnt_ptr): the next launch's input transform.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    t_lo = tl.program_id(2) * T_PER_SPLIT
    m = tl.arange(0, BM)
    if ROUTED:
        e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        if (e < 0) | (e >= N_EXPERTS):  # skipped slot
            if GATHER_A:  # a zero row for launch 2's input (its transform, when fused here, is zero too)
                n = pid_n * BN + tl.arange(0, BN)
                if HAD > 0:
                    tl.store(out_ptr + pid_m.to(tl.int64) * out_stride + n, tl.zeros((BN,), tl.float32))
                else:
                    tl.store(y_ptr + pid_m.to(tl.int64) * y_stride + n, tl.zeros((BN,), y_ptr.dtype.element_ty),
                             mask=n < N)
            elif FINISH:  # no contribution, but the block's ticket count includes this program
                _finish(y_ptr, y_stride, out_ptr, out_stride, bias_ptr, cnt_ptr, pid_n, TICKETS, N_TOK, N_OUT,
                        BN, TB, HAS_BIAS)
            return
        valid = m < 1
        slot = (pid_m + m).to(tl.int64)
        if GATHER_A:
            x_rows = slot // TOP_K
            y_rows = slot
        else:
            x_rows = slot
            y_rows = slot // TOP_K
        tr_ptr += e * tr_estride
        sc_ptr += e * sc_estride
    else:
        valid = m < M
        x_rows = m.to(tl.int64)
        y_rows = x_rows
    NW: tl.constexpr = 16 * BITS
    rows = pid_n * BN + tl.arange(0, BN)
    tiles = tl.arange(0, J)
    nmask = rows < N
    offs = run_history_offsets(rows, tiles, KT, BITS)
    if SWIGLU:
        up_offs = run_history_offsets(GATE_OFF + rows, tiles, KT, BITS)
        acc_up = tl.zeros((BM, BN, J), dtype=tl.float32)
    acc = tl.zeros((BM, BN, J), dtype=tl.float32)
    x_row_ptr = x_ptr + x_rows[:, None] * x_stride
    for t0 in range(t_lo, tl.minimum(t_lo + T_PER_SPLIT, KT), J):
        tmask = (t0 + tiles) < KT
        wmask = nmask[:, None] & tmask[None, :]
        tr = tr_ptr + t0 * NW
        a, b = run_strings(tr, offs, wmask, BITS)
        if SWIGLU:
            ua, ub = run_strings(tr, up_offs, wmask, BITS)
        xp = x_row_ptr + (t0 + tiles)[None, :] * 16
        xmask = valid[:, None] & tmask[None, :]
        for c in tl.static_range(16):
            xc = tl.load(xp + c, mask=xmask, other=0).to(tl.float32)[:, None, :]
            acc += xc * code_value(run_window(a, b, c, BITS, L), MUL, ADD, FP16SUM)[None, :, :]
            if SWIGLU:
                acc_up += xc * code_value(run_window(ua, ub, c, BITS, L), MUL, ADD, FP16SUM)[None, :, :]
    y = tl.sum(acc, axis=2) * (tl.load(sc_ptr + rows, mask=nmask, other=0).to(tl.float32) * NORM)[None, :]
    if SWIGLU:
        up = tl.sum(acc_up, axis=2) * (tl.load(sc_ptr + GATE_OFF + rows, mask=nmask, other=0).to(tl.float32)
                                       * NORM)[None, :]
        y = y / (1 + tl.exp(-y)) * up
    if ROUTED and not GATHER_A:
        y = y * tl.load(w_ptr + pid_m + m, mask=valid, other=0).to(tl.float32)[:, None]
    ptrs = y_ptr + y_rows[:, None] * y_stride + rows[None, :]
    ymask = valid[:, None] & nmask[None, :]
    if ATOMIC:  # relaxed: ordering, where needed, comes from the ticket in `_finish`
        tl.atomic_add(ptrs, y, mask=ymask, sem="relaxed")
        if FINISH:
            _finish(y_ptr, y_stride, out_ptr, out_stride, bias_ptr, cnt_ptr, pid_n, TICKETS, N_TOK, N_OUT,
                    BN, TB, HAS_BIAS)
    elif FINISH:  # one program per output block: write the result directly
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=rows < N_OUT, other=0).to(tl.float32)[None, :]
        tl.store(out_ptr + y_rows[:, None] * out_stride + rows[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & (rows < N_OUT)[None, :])
    else:
        tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=ymask)
    if HAD > 0:  # the last program of this slot's HAD-block transforms it (ordering: `_last_to_arrive`)
        g = pid_n * BN // HAD
        if _last_to_arrive(cnt_ptr + pid_m * (tl.num_programs(1) * BN // HAD) + g, HAD // BN):
            cols = g * HAD + tl.arange(0, HAD)
            v = tl.load(y_ptr + pid_m.to(tl.int64) * y_stride + cols, mask=cols < N, other=0, cache_modifier=".cg")
            v = fwht((v * tl.load(s_ptr + cols).to(tl.float32))[None, :], 1, HAD, LOGHAD) * HAD_SCALE
            tl.store(out_ptr + pid_m.to(tl.int64) * out_stride + cols[None, :], v)


@triton.jit
def _gemm_kernel(a_ptr, a_stride, ids_ptr, expert_ids_ptr, tr_ptr, tr_estride, sc_ptr, sc_estride,
                 y_ptr, y_stride, M, N, K, KT, K_PER_SPLIT, TOP_K, GATE_OFF, NORM,
                 w_ptr, out_ptr, out_stride, N_OUT, cnt_ptr, TICKETS, N_TOK, s_ptr, HAD_SCALE, bias_ptr,
                 BITS: tl.constexpr, L: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
                 FP16SUM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 ROUTED: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_Y: tl.constexpr,
                 SWIGLU: tl.constexpr, DOT: tl.constexpr, RUNS: tl.constexpr, ATOMIC: tl.constexpr,
                 WEIGHTED: tl.constexpr, FINISH: tl.constexpr, TB: tl.constexpr, HAD: tl.constexpr,
                 LOGHAD: tl.constexpr, RB: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Row r of block pid_m: without ROUTED, row r of A and y. With ROUTED, ids[r] is a flat
    (token, slot) index (>= M marks padding): A row ids[r] // TOP_K when GATHER_A, else r;
    y row ids[r] when SCATTER_Y, else r; WEIGHTED (with SCATTER_Y, ATOMIC): y row ids[r] // TOP_K +=
    w[ids[r]] * result, the weighted sum over slots. SWIGLU: y[:, n] = silu(W'[n] x) * (W'[GATE_OFF + n] x).
    K is split over grid axis 2 in slices of K_PER_SPLIT, summed into y with fp32 atomics when ATOMIC.
    FINISH (ATOMIC): the last of the TICKETS programs of output block pid_n writes out[:N_TOK, block] = y
    (+ bias) in out's dtype (`_finish`; unused blocks take their ticket too).
    HAD > 0 (ROUTED, SWIGLU, one K slice): out[block rows] = HAD_SCALE * H(s_ptr * y) per HAD-block of columns
    (padding rows zero; RB rows at a time), done by the last of the HAD // BN programs of (pid_m, HAD-block)
    (ticket in cnt_ptr): the next launch's input transform, as in `_gemv_kernel`."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k_lo = tl.program_id(2) * K_PER_SPLIT
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if e < 0:  # past the last used block
        if FINISH:
            _finish(y_ptr, y_stride, out_ptr, out_stride, bias_ptr, cnt_ptr, pid_n, TICKETS, N_TOK, N_OUT, BN, TB,
                    HAS_BIAS)
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
            y_rows = ids // TOP_K if WEIGHTED else ids
    else:
        valid = r < M
        a_rows = r
        y_rows = r
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    tr = tr_ptr + e * tr_estride
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    tiles = tl.arange(0, BK // 16)
    if RUNS:
        offs = run_history_offsets(n, tiles, KT, BITS)
        up_offs = run_history_offsets(GATE_OFF + n, tiles, KT, BITS)
    else:
        off0, off1, shift = window_offsets(n[None, :], tl.arange(0, BK)[:, None], KT, BITS, L)
        up0, up1, up_shift = window_offsets(GATE_OFF + n[None, :], tl.arange(0, BK)[:, None], KT, BITS, L)
    if SWIGLU:
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    a_row_ptr = a_ptr + a_rows.to(tl.int64)[:, None] * a_stride
    for k0 in range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BK):
        tr_k = tr + (k0 // 16) * (16 * BITS)
        if RUNS:
            # 16 dots per step, one per weight c of the runs: A columns k0 + 16 j + c against the
            # runs' c-th weights, so each thread's runs stay whole and no decoded weight moves
            tmask = (k0 // 16 + tiles) < KT
            rmask = nmask[:, None] & tmask[None, :]
            sa, sb = run_strings(tr_k, offs, rmask, BITS)
            if SWIGLU:
                ua, ub = run_strings(tr_k, up_offs, rmask, BITS)
            ap = a_row_ptr + (k0 + 16 * tiles)[None, :]
            amask = valid[:, None] & tmask[None, :]
            for c in tl.static_range(16):
                a = tl.load(ap + c, mask=amask, other=0).to(DOT)
                w = code_value(run_window(sa, sb, c, BITS, L), MUL, ADD, FP16SUM)
                acc = tl.dot(a, tl.trans(w.to(DOT)), acc)
                if SWIGLU:
                    wu = code_value(run_window(ua, ub, c, BITS, L), MUL, ADD, FP16SUM)
                    acc_up = tl.dot(a, tl.trans(wu.to(DOT)), acc_up)
        else:
            cols = k0 + tl.arange(0, BK)
            kmask = cols < K
            a = tl.load(a_row_ptr + cols[None, :], mask=valid[:, None] & kmask[None, :], other=0).to(DOT)
            wmask = kmask[:, None] & nmask[None, :]
            acc = tl.dot(a, decode_at(tr_k, off0, off1, shift, wmask, L, MUL, ADD, FP16SUM).to(DOT), acc)
            if SWIGLU:
                wu = decode_at(tr_k, up0, up1, up_shift, wmask, L, MUL, ADD, FP16SUM)
                acc_up = tl.dot(a, wu.to(DOT), acc_up)
    sc_base = sc_ptr + e * sc_estride
    y = acc * (tl.load(sc_base + n, mask=nmask, other=0).to(tl.float32) * NORM)[None, :]
    if SWIGLU:
        up = acc_up * (tl.load(sc_base + GATE_OFF + n, mask=nmask, other=0).to(tl.float32) * NORM)[None, :]
        y = y / (1 + tl.exp(-y)) * up
    if WEIGHTED:
        y = y * tl.load(w_ptr + ids, mask=valid, other=0).to(tl.float32)[:, None]
    ptrs = y_ptr + y_rows.to(tl.int64)[:, None] * y_stride + n[None, :]
    if ATOMIC:  # relaxed: read by a later launch, or ordered by the ticket in `_finish`
        tl.atomic_add(ptrs, y, mask=valid[:, None] & nmask[None, :], sem="relaxed")
        if FINISH:
            _finish(y_ptr, y_stride, out_ptr, out_stride, bias_ptr, cnt_ptr, pid_n, TICKETS, N_TOK, N_OUT, BN, TB,
                    HAS_BIAS)
    else:
        tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=valid[:, None] & nmask[None, :])
    if HAD > 0:  # the last program of this block's HAD-block transforms it (ordering: `_last_to_arrive`)
        g = pid_n * BN // HAD
        if _last_to_arrive(cnt_ptr + pid_m * (tl.num_programs(1) * BN // HAD) + g, HAD // BN):
            cols = g * HAD + tl.arange(0, HAD)
            sg = tl.load(s_ptr + cols).to(tl.float32)[None, :]
            for r0 in tl.static_range(0, BM, RB):  # RB rows at a time: a [RB, HAD] tile stays in registers
                rr = (pid_m * BM + r0 + tl.arange(0, RB)).to(tl.int64)
                ok = tl.load(ids_ptr + rr) < M
                v = tl.load(y_ptr + rr[:, None] * y_stride + cols[None, :], mask=ok[:, None] & (cols < N)[None, :],
                            other=0, cache_modifier=".cg")
                v = fwht(v * sg, RB, HAD, LOGHAD) * HAD_SCALE
                tl.store(out_ptr + rr[:, None] * out_stride + cols[None, :], v.to(out_ptr.dtype.element_ty))


def _runs(decode: str | None) -> bool:
    """RUNS flag of the kernels for a decode name (None: the default, `DECODE`)."""
    decode = decode or DECODE
    if decode not in ("gather", "runs"):
        raise ValueError(f"decode must be 'gather' or 'runs', got {decode!r}")
    return decode == "runs"


def dot_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Tensor-core operand type for activations of `dtype` (fp32 runs as tf32 on GPUs).

    Triton's interpreter computes bf16 `tl.dot` on the raw bits, so there bf16 runs as fp32.
    """
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "") == "1":
        return torch.float32
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


GEMV_BN, GEMV_J, GEMV_WARPS = 32, 32, 4  # each thread: 8 runs of one tile; 4 warps split the K step


def gemv_launch(x: torch.Tensor, qt, *, tr: torch.Tensor, scales: torch.Tensor, y: torch.Tensor, n_out: int,
                split: int, rows: int = 1, expert_ids=None, weights=None, top_k: int = 1, gather_a: bool = False,
                gate_off: int = 0, out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                counters: torch.Tensor | None = None, n_tok: int = 0, had: tuple | None = None) -> None:
    """Launch `_gemv_kernel` (dense, or ROUTED when expert_ids is given: see there); rows: programs on
    axis 0 (routed: one per flat slot); split: K slices (from `gemv_split`), summed atomically into y.

    out: write the final [n_tok, out_features] result (+ bias) there in its dtype (FINISH); when the launch
    adds atomically, y must be fp32 and `counters` (int32, one per output block) zero, both zeroed by an
    earlier launch. had = (hr, signs, block) (launch 1 with SwiGLU): also write the next launch's input
    transform H(signs * y) into hr; `counters` then holds one zeroed int32 per (slot, block)."""
    KT = tr.shape[-2]
    t_per = triton.cdiv(triton.cdiv(KT, GEMV_J), split) * GEMV_J
    routed = expert_ids is not None
    grid = (rows, triton.cdiv(n_out, GEMV_BN), triton.cdiv(KT, t_per))
    atomic = grid[2] > 1 or (routed and not gather_a)
    if (out is not None and atomic or had is not None) and counters is None:
        raise ValueError("gemv_launch: a fused epilogue with tickets needs zeroed counters")
    target = out if out is not None else had[0] if had is not None else y
    launch(_gemv_kernel, grid, x, x.stride(0), expert_ids if routed else x, tr, tr[0].numel() if routed else 0,
           scales, scales[0].numel() if routed else 0, y, y.stride(0), weights if weights is not None else x,
           rows if routed else x.shape[0], n_out, KT, t_per, top_k, tr.shape[0] if routed else 1, gate_off,
           code_norm(qt), target, target.stride(0), target.shape[-1], bias if bias is not None else x,
           had[1] if had is not None else x, counters if counters is not None else x, grid[0] * grid[2], n_tok,
           had[2] ** -0.5 if had is not None else 1.0,
           BM=1 if routed else triton.next_power_of_2(x.shape[0]), BN=GEMV_BN, J=GEMV_J, ATOMIC=atomic,
           ROUTED=routed, GATHER_A=gather_a, SWIGLU=gate_off > 0, FINISH=out is not None,
           TB=triton.next_power_of_2(max(1, n_tok)), HAS_BIAS=bias is not None,
           HAD=had[2] if had is not None else 0, LOGHAD=had[2].bit_length() - 1 if had is not None else 0,
           num_warps=GEMV_WARPS, **code_params(qt))


def gemv_split(device: torch.device, programs: int, KT: int, split_k: int | None = None) -> int:
    """K slices for a GEMV of `programs` (rows x output blocks): by default enough for ~8 programs per SM."""
    if split_k is None:
        split_k = sm_count(device) * 8 // max(1, programs)
    steps = triton.cdiv(KT, GEMV_J)
    per = triton.cdiv(steps, max(1, min(steps, split_k)))
    return triton.cdiv(steps, per)


def gemv(xr: torch.Tensor, qt, split_k: int | None = None) -> torch.Tensor:
    """y [M, out_pad] fp32 = xr [M, in_pad] @ W'^T for M <= GEMV_MAX_ROWS (2-D qt).

    split_k: K slices summed with atomics; by default enough for ~8 programs per SM.
    """
    M = xr.shape[0]
    N = qt.trellis.shape[0] * 16
    split = gemv_split(xr.device, triton.cdiv(N, GEMV_BN), qt.trellis.shape[1], split_k)
    y = (torch.zeros if split > 1 else torch.empty)(M, N, dtype=torch.float32, device=xr.device)
    gemv_launch(xr, qt, tr=qt.trellis, scales=qt.scales, y=y, n_out=N, split=split)
    return y


def gemm_bn(n_out: int, gate_off: int = 0) -> int:
    """Outputs per `_gemm_kernel` program (SwiGLU: two accumulators and two decodes, so at most 32)."""
    return 64 if n_out >= 64 and not gate_off else 32 if n_out >= 32 else 16


def gemm(a: torch.Tensor, tr: torch.Tensor, scales: torch.Tensor, qt, *, n_out: int, out: torch.Tensor,
         block_m: int, expert_ids: torch.Tensor, ids: torch.Tensor | None = None, n_valid: int | None = None,
         top_k: int = 1, gather_a: bool = False, scatter_y: bool = False, gate_off: int = 0,
         decode: str | None = None, split: int = 1, weights: torch.Tensor | None = None,
         finish: torch.Tensor | None = None, counters: torch.Tensor | None = None, n_tok: int = 0,
         had: tuple | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Launch `_gemm_kernel`: out[rows, :n_out] = (a @ W'^T)[rows] (or SwiGLU of it when gate_off > 0).

    tr/scales: [E, out/16, in/16, 16*bits] / [E, out] (a 2-D weight is a stack of one);
    expert_ids: the expert of each block of block_m rows (-1: skip); ids: flat routed indices;
    split: K slices (linear outputs only), added atomically into `out`, which must then be zeroed.
    weights (with scatter_y): out [T, n_out] is zeroed and row ids // top_k gets weights[ids] * result
    (atomics). finish [n_tok, :]: the cast result, written by the last program per output block
    (`counters`: one zeroed int32 per block of `gemm_bn(n_out)` outputs), plus bias. had = (hr, signs, block)
    (SwiGLU): also write the next launch's input transform H(signs * out) into hr (rows like out); `counters` then
    holds one zeroed int32 per (block of block_m rows, Hadamard block).
    """
    K = a.shape[1]
    KT = tr.shape[-2]
    BN = gemm_bn(n_out, gate_off)
    BK = 256 if _runs(decode) else 64 if K >= 64 else 32 if K >= 32 else 16
    k_per = triton.cdiv(triton.cdiv(K, BK), split) * BK
    grid = (expert_ids.shape[0], triton.cdiv(n_out, BN), triton.cdiv(K, k_per))
    routed = ids is not None
    weighted = weights is not None
    if weighted and not scatter_y or (finish is not None or had is not None) and counters is None:
        raise ValueError("gemm: weights need scatter_y, finish / had need zeroed counters")
    if bias is not None and finish is None:
        raise ValueError("gemm: a bias is added by the finishing epilogue only")
    if had is not None and (not routed or grid[2] > 1 or scatter_y or had[2] % BN or had[1].shape[0] != grid[1] * BN):
        raise ValueError("gemm: had needs one K slice, rows in place and output blocks tiling the signs")
    atomic = grid[2] > 1 or weighted or finish is not None
    target = finish if finish is not None else had[0] if had is not None else out
    launch(_gemm_kernel, grid, a, a.stride(0), ids if routed else expert_ids, expert_ids, tr, tr[0].numel(), scales,
                       scales[0].numel(), out, out.stride(0), n_valid if routed else a.shape[0], n_out, K, KT,
                       k_per, top_k, gate_off, code_norm(qt), weights if weighted else out, target, target.stride(0),
                       finish.shape[-1] if finish is not None else n_out, counters if counters is not None else out,
                       grid[0] * grid[2], n_tok, had[1] if had is not None else out,
                       had[2] ** -0.5 if had is not None else 1.0, bias if bias is not None else out, BM=block_m,
                       BN=BN, BK=BK, ROUTED=routed, GATHER_A=gather_a,
                       SCATTER_Y=scatter_y, SWIGLU=gate_off > 0, DOT=_DOT_DTYPES[a.dtype],
                       RUNS=_runs(decode), ATOMIC=atomic, WEIGHTED=weighted, FINISH=finish is not None,
                       TB=min(64, triton.next_power_of_2(max(1, n_tok))), HAD=had[2] if had is not None else 0,
                       LOGHAD=had[2].bit_length() - 1 if had is not None else 0,
                       RB=min(block_m, max(1, 4096 // had[2])) if had is not None else 1,
                       HAS_BIAS=bias is not None, **code_params(qt),
                       maxnreg=_max_registers(qt.bits, block_m, finish is not None))
    return out


def _max_registers(bits: int, block_m: int, finish: bool) -> int | None:
    """ptxas's register limit for `_gemm_kernel`, where its own choice spilled (bench/sass.py,
    tests/test_sass.py): 4 bits keep two strings per run and spilled under the 128 it picks by itself in
    16-row blocks; with the cast epilogue it picked 96 at 3 bits there (a longer loop, and spills), so the
    routed 16-row blocks are capped at 128; the 32-row blocks at 3 and 4 bits with the epilogue need up to 232
    (at 168 or 192: 8-24 bytes of stack); larger blocks at 2 and 3 bits are left to ptxas (149-166 on sm_90)."""
    if block_m == 32 and bits > 2 and finish:
        return 232
    if bits == 4:
        return 168
    if block_m > 16:
        return None
    return 128 if finish else None


def matmul(xr: torch.Tensor, qt, decode: str | None = None, split_k: int | None = None) -> torch.Tensor:
    """y [M, out_pad] fp32 = xr [M, in_pad] @ W'^T for a 2-D quantized weight.

    split_k (GEMM path): K slices summed with atomics; by default enough for ~4 programs per SM."""
    M = xr.shape[0]
    if M == 0:
        return torch.zeros(0, qt.trellis.shape[0] * 16, dtype=torch.float32, device=xr.device)
    if M <= GEMV_MAX_ROWS:
        return gemv(xr.float().contiguous(), qt)
    N = qt.trellis.shape[0] * 16
    BM, split = _gemm_shape(M, N, xr.shape[1], xr.device, split_k)
    expert_ids = torch.zeros(triton.cdiv(M, BM), dtype=torch.int32, device=xr.device)
    y = (torch.zeros if split > 1 else torch.empty)(M, N, dtype=torch.float32, device=xr.device)
    return gemm(xr.contiguous(), qt.trellis[None], qt.scales[None], qt, n_out=N, out=y, block_m=BM,
                expert_ids=expert_ids, decode=decode, split=split)


def max_block_m(device: torch.device) -> int:
    """Rows per dense GEMM block at most: 64, but 32 on GPUs before sm_90, where ptxas compiles 64-row blocks to
    255 registers with spills (28-31 SASS instructions per weight in the loop against 9.3-9.7 in 32-row
    blocks, which decode each weight twice per 64 rows: 0.29 against 0.44 per weight and row)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return 32
    return 64


def _gemm_shape(M: int, N: int, K: int, device: torch.device, split_k: int | None = None) -> tuple[int, int]:
    """(rows per block, K slices) of the dense GEMM: by default about 4 programs (16 warps) per SM, as few K
    slices as that allows."""
    BM = 16 if M <= 16 else 32 if M <= 32 else max_block_m(device)
    if split_k is None:
        split_k = sm_count(device) * 4 // (triton.cdiv(M, BM) * triton.cdiv(N, 64))
    return BM, max(1, min(split_k, triton.cdiv(K, 256)))


def _qlinear_gemm(x2: torch.Tensor, qt, bias: torch.Tensor | None, decode: str | None) -> torch.Tensor:
    """More rows, output side not rotated: two launches. The input transform also zeroes the GEMM's fp32 sum,
    its block experts (one expert: all 0) and tickets; the GEMM's last program per output block adds the
    bias and casts."""
    from .hadamard import transform

    M, out_f = x2.shape[0], qt.shape[-2]
    N = qt.trellis.shape[0] * 16
    BM, split = _gemm_shape(M, N, qt.trellis.shape[1] * 16, x2.device)
    blocks, n_cnt = triton.cdiv(M, BM), triton.cdiv(N, gemm_bn(N))
    scratch = torch.empty(M * N + blocks + n_cnt, dtype=torch.float32, device=x2.device)
    y, expert_ids = scratch[:M * N].view(M, N), scratch[M * N:M * N + blocks].view(torch.int32)
    xr = transform(x2, qt.signs_in, qt.had_in, dot_dtype(x2.dtype, x2.device), zero=scratch)
    out = torch.empty(M, out_f, dtype=x2.dtype, device=x2.device)
    gemm(xr, qt.trellis[None], qt.scales[None], qt, n_out=N, out=y, block_m=BM, expert_ids=expert_ids,
         decode=decode, split=split, finish=out, counters=scratch[M * N + blocks:].view(torch.int32), n_tok=M,
         bias=bias)
    return out


def _qlinear_gemv(x2: torch.Tensor, qt, bias: torch.Tensor | None) -> torch.Tensor:
    """A few rows, output side not rotated: two launches. The input transform also zeroes the GEMV's fp32
    partial sums and tickets; the GEMV's last program per output block adds the bias and casts."""
    from .hadamard import transform

    M, out_f = x2.shape[0], qt.shape[-2]
    N = qt.trellis.shape[0] * 16
    split = gemv_split(x2.device, triton.cdiv(N, GEMV_BN), qt.trellis.shape[1])
    out = torch.empty(M, out_f, dtype=x2.dtype, device=x2.device)
    scratch = y = counters = None
    if split > 1:  # [y | one ticket counter per output block], zeroed by the transform
        scratch = torch.empty(M * N + triton.cdiv(N, GEMV_BN), dtype=torch.float32, device=x2.device)
        y, counters = scratch[:M * N].view(M, N), scratch[M * N:].view(torch.int32)
    xr = transform(x2, qt.signs_in, qt.had_in, torch.float32, zero=scratch)
    gemv_launch(xr, qt, tr=qt.trellis, scales=qt.scales, y=out if y is None else y, n_out=N, split=split, out=out,
                bias=bias, counters=counters, n_tok=M)
    return out


def decode_once(M: int, qt) -> bool:
    """Whether x2 @ W^T with M rows takes the prefill path (`_qlinear_dequant`)."""
    return M >= DEQUANT_MIN_ROWS and M * qt.trellis.shape[0] * qt.trellis.shape[1] * 256 >= DEQUANT_MIN_MACS


def _qlinear_dequant(x2: torch.Tensor, qt, bias: torch.Tensor | None) -> torch.Tensor:
    """Many rows, output side not rotated: W' decoded once to the activations' 16-bit type, x rotated, one
    cuBLAS GEMM with the bias."""
    from .hadamard import transform

    dt = dot_dtype(x2.dtype, x2.device)
    xr = transform(x2, qt.signs_in, qt.had_in, dt)
    b = None if bias is None else bias.to(dt)
    return torch.nn.functional.linear(xr, rotated_weight(qt, dt)[:qt.shape[-2]], b).to(x2.dtype)


def qlinear(x: torch.Tensor, qt, bias: torch.Tensor | None = None, decode: str | None = None) -> torch.Tensor:
    """Triton twin of `reference.qlinear`: rotate x, fused decode-matmul, unrotate y; at prefill sizes
    (`decode_once`) W' is decoded once and cuBLAS multiplies. decode: the fused kernels' decode ('gather' or
    'runs'); naming one keeps the fused GEMM at any size."""
    from .hadamard import transform

    lead, out_f = x.shape[:-1], qt.shape[-2]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] and gemv_tc.supported(x2, qt):
        return gemv_tc.qlinear_tc(x2, qt, bias).reshape(*lead, out_f)
    once = decode is None and decode_once(x2.shape[0], qt)
    if once and qt.signs_out is None:
        return _qlinear_dequant(x2, qt, bias).reshape(*lead, out_f)
    small = x2.shape[0] <= GEMV_MAX_ROWS
    if small and x2.shape[0] and qt.signs_out is None:
        return _qlinear_gemv(x2, qt, bias).reshape(*lead, out_f)
    if x2.shape[0] and qt.signs_out is None:
        return _qlinear_gemm(x2, qt, bias, decode).reshape(*lead, out_f)
    xr = transform(x2, qt.signs_in, qt.had_in, torch.float32 if small else dot_dtype(x.dtype, x.device))
    y = xr @ rotated_weight(qt, xr.dtype).T if once else matmul(xr, qt, decode)
    if qt.signs_out is not None:
        y = transform(y, qt.signs_out, qt.had_out, sign_after=True)
    y = y[:, :out_f]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, out_f)
