"""Tail-biting Viterbi search as a fused Triton kernel: the GPU path.

One program searches one tile and keeps the trellis on chip. It never stores the 2^L path
costs: with B_t[m] = min_p cost_t[m + p*Q] (Q = 2^(L-k); m is the high L-k bits that the
K = 2^k successors (m << k) | n share), a step is

    B_t[a*K + n] = min_p  B_{t-1}[p*(Q/K) + a] + w_t * (x_t - code(p*Q + a*K + n))^2

so the loop carries only Q costs (16,384 fp32 at L = 16, 2 bits), the code values are
computed from the state (the codes are hashes, no table), the min over p is a tree of
strict compares on a [Q/K, K, K] tensor (lowest p wins ties, as in the numba search) and only
the back-pointers (one byte per m and step) go to global memory. The same arithmetic in the
same order as the numba search, with FMA contraction off, gives bit-identical costs, so both
backends pick the same states. The two tail-biting passes are two launches of the forward
kernel (free start on the tile rotated by T/2, then start/end forced to the overlap), each
followed by a batched backtrace kernel.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .codes import FP16_MASK, FP16_XOR, Code, get_code

# back-pointer scratch per launch (bytes): bounds device memory for large batches
BP_BUDGET = 1 << 32


@triton.jit
def _code_value(s, MUL: tl.constexpr, ADD: tl.constexpr, BYTESUM: tl.constexpr, NORM: tl.constexpr):
    """The code's value of uint32 states s, rounded exactly as ccq.codec.codes.code_values."""
    h = s * MUL + ADD
    if BYTESUM:
        y = (h & 0x00FF00FF) + ((h >> 8) & 0x00FF00FF)
        # byte sum - 510 as the float 1.5 * 2^23 + v (exact), then the integer value
        f = ((y & 0xFFFF) + (y >> 16) + (0x4B400000 - 510)).to(tl.float32, bitcast=True) - 12582912.0
    else:
        h = (h & FP16_MASK_C) ^ FP16_XOR_C
        lo = (h & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (h >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        f = lo + hi
    return f * NORM


FP16_MASK_C = tl.constexpr(FP16_MASK)
FP16_XOR_C = tl.constexpr(FP16_XOR)


@triton.jit
def _forward(x_ptr, w_ptr, ov_ptr, bp_ptr, end_ptr, cost_ptr, T, SHIFT,
             L: tl.constexpr, KB: tl.constexpr, CONSTRAINED: tl.constexpr,
             MUL: tl.constexpr, ADD: tl.constexpr, BYTESUM: tl.constexpr, NORM: tl.constexpr):
    """Viterbi over one tile (x[(t + SHIFT) % T]): back-pointers into bp[tile, t, m] (rows 1..T-1),
    the best end state into end_ptr and its cost into cost_ptr."""
    K: tl.constexpr = 1 << KB
    Q: tl.constexpr = 1 << (L - KB)
    QK: tl.constexpr = Q // K
    tile = tl.program_id(0).to(tl.int64)
    a = tl.arange(0, QK)[:, None, None]
    n = tl.arange(0, K)[None, :, None]
    p = tl.arange(0, K)[None, None, :]
    base = (a * K + n).to(tl.uint32)  # [QK, K, 1]: m' = a*K + n
    s_off = (p * Q).to(tl.uint32)  # [1, 1, K]
    if CONSTRAINED:
        ov = tl.load(ov_ptr + tile)
        # B_{-1}: zero for the forced high bits, +inf elsewhere
        best = tl.where(tl.arange(0, Q) == ov, 0.0, float("inf"))
    else:
        best = tl.zeros([Q], tl.float32)
    row = x_ptr + tile * T
    wrow = w_ptr + tile * T
    bprow = bp_ptr + tile * T * Q
    for t in range(0, T - 1):
        j = (t + SHIFT) % T
        xt = tl.load(row + j)
        wt = tl.load(wrow + j)
        # a loop-variant zero (x is finite) keeps the compiler from hoisting 2^L code values
        zero = (xt != xt).to(tl.uint32)
        c = _code_value(base + s_off + zero, MUL, ADD, BYTESUM, NORM)
        d = xt - c
        bt = tl.trans(tl.reshape(best, [K, QK]))  # bt[a, p] = B[p*QK + a]
        cost = bt[:, None, :] + wt * d * d  # [QK, K(n), K(p)]
        idx = tl.zeros([QK, K, K], tl.int32) + p
        for _ in tl.static_range(KB):  # tree over p, low bit first; ties keep the lower p
            c0, c1 = tl.split(tl.reshape(cost, [QK, K, cost.shape[2] // 2, 2]))
            i0, i1 = tl.split(tl.reshape(idx, [QK, K, idx.shape[2] // 2, 2]))
            take = c1 < c0
            cost = tl.where(take, c1, c0)
            idx = tl.where(take, i1, i0)
        best = tl.reshape(cost, [Q])
        tl.store(bprow + (t + 1) * Q + tl.arange(0, Q), tl.reshape(idx, [Q]).to(tl.uint8))
    j = (T - 1 + SHIFT) % T
    xt = tl.load(row + j)
    wt = tl.load(wrow + j)
    s = base + s_off  # s = p*Q + a*K + n, m = s >> k = p*QK + a
    d = xt - _code_value(s, MUL, ADD, BYTESUM, NORM)
    bt = tl.trans(tl.reshape(best, [K, QK]))
    cost = bt[:, None, :] + wt * d * d
    s = s.to(tl.int32)
    if CONSTRAINED:  # end states whose low L-k bits are the overlap; lowest s on ties
        cost = tl.where((s & (Q - 1)) == ov, cost, float("inf"))
        key = s
    else:  # numba's argmin order: n*Q + m
        key = (s & (K - 1)) * Q + (s >> KB)
    top = tl.min(tl.reshape(cost, [K * Q]), axis=0)
    pick = tl.min(tl.reshape(tl.where(cost == top, key, 1 << L), [K * Q]), axis=0)
    if not CONSTRAINED:
        pick = (pick % Q) * K + pick // Q
    tl.store(end_ptr + tile, pick)
    tl.store(cost_ptr + tile, top)


@triton.jit
def _backtrace(bp_ptr, end_ptr, out_ptr, N, T, STOP,
               L: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr):
    """Follow the back-pointers of BLOCK tiles from their end states down to t = STOP."""
    Q: tl.constexpr = 1 << (L - KB)
    tiles = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = tiles < N
    tiles = tiles.to(tl.int64)
    s = tl.load(end_ptr + tiles, mask=ok, other=0)
    tl.store(out_ptr + tiles * T + T - 1, s, mask=ok)
    for t in range(T - 1, STOP, -1):
        m = s >> KB
        j = tl.load(bp_ptr + (tiles * T + t) * Q + m, mask=ok, other=0).to(tl.int32)
        s = m | (j << (L - KB))
        tl.store(out_ptr + tiles * T + t - 1, s, mask=ok)


def _launch(x, w, code: Code, k: int, L: int, shift: int, ov, bp, num_warps: int):
    N, T = x.shape
    ends = torch.empty(N, dtype=torch.int32, device=x.device)
    costs = torch.empty(N, dtype=torch.float32, device=x.device)
    norm = float(np.float32(code.norm))
    _forward[(N,)](x, w, ov if ov is not None else ends, bp, ends, costs, T, shift, L=L, KB=k,
                   CONSTRAINED=ov is not None, MUL=code.mul, ADD=code.add, BYTESUM=code.kind == "bytesum",
                   NORM=norm, num_warps=num_warps, enable_fp_fusion=False)
    states = torch.empty((N, T), dtype=torch.int32, device=x.device)
    block = 128
    stop = shift if ov is None else 0
    _backtrace[(triton.cdiv(N, block),)](bp, ends, states, N, T, stop, L=L, KB=k, BLOCK=block)
    return states, costs


def num_warps_for(L: int) -> int:
    """Warps per program: 2^L states over at most 64 per thread, 4..32 warps."""
    return max(4, min(32, (1 << L) // (64 * 32)))


@torch.no_grad()
def viterbi_tiles_triton(x: torch.Tensor, w, code: str | Code, k: int, L: int):
    """Search N tail-biting sequences of x's device; returns (states int32 [N, T], cost [N]).

    Same result as viterbi_tiles(x, w, code_table(code, L), k, L) with candidates=1."""
    code = get_code(code) if not isinstance(code, Code) else code
    x = x.float().contiguous()
    w = torch.broadcast_to(torch.as_tensor(w, dtype=torch.float32, device=x.device), x.shape).contiguous()
    N, T = x.shape
    Q = 1 << (L - k)
    half = T // 2
    chunk = max(1, min(N, BP_BUDGET // (T * Q)))
    bp = torch.empty((chunk, T, Q), dtype=torch.uint8, device=x.device)
    states = torch.empty((N, T), dtype=torch.int32, device=x.device)
    costs = torch.empty(N, dtype=torch.float32, device=x.device)
    nw = num_warps_for(L)
    for i in range(0, N, chunk):
        xb, wb = x[i : i + chunk], w[i : i + chunk]
        rot, _ = _launch(xb, wb, code, k, L, half, None, bp, nw)
        # rot[t] is the state at original position (t + half) % T, as in the numba search
        overlap = (rot[:, half] >> k).contiguous()
        states[i : i + chunk], costs[i : i + chunk] = _launch(xb, wb, code, k, L, 0, overlap, bp, nw)
    return states, costs
