"""Tail-biting Viterbi search as a fused Triton kernel: the GPU path.

One program searches one tile and keeps the trellis on chip. It never stores the 2^L path
costs: with B_t[m] = min_p cost_t[m + p*Q] (Q = 2^(L-k); m is the high L-k bits that the
K = 2^k successors (m << k) | n share), a step is

    B_t[a*K + n] = min_p  B_{t-1}[p*(Q/K) + a] + w_t * (x_t - code(p*Q + a*K + n))^2

so the loop carries only Q costs (16,384 fp32 at L = 16, 2 bits) as K register tensors (the
rows p), the code values are computed from the state (the codes are hashes, no table), the
min over p is a strict compare in increasing p (the lowest p wins ties, as in the numba
search), and only the back-pointers go to global memory (per step and class a, the K
pointers of the states a*K + n packed k bits each into one word: 4 KB per step at L = 16). The same
arithmetic in the same order as the numba search, with FMA contraction off, gives
bit-identical costs, so both backends pick the same states. The two tail-biting passes are
two launches of the forward kernel (free start on the tile rotated by T/2, then start/end
forced to the overlap), each followed by the end-state selection and a batched backtrace.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from .codes import FP16_MASK, FP16_XOR, Code, get_code

# back-pointer scratch per launch: a quarter of the free device memory, at least 1 GB (a tile
# takes 256 * 2^(L-k) * k/8 bytes or so: 1 MB at L = 16, 2 bits, ~30,000 tiles on an H200)
BP_MIN_BYTES = 1 << 30


def _bp_budget(device: torch.device) -> int:
    if device.type == "cuda":
        return max(BP_MIN_BYTES, torch.cuda.mem_get_info(device)[0] // 4)
    return BP_MIN_BYTES


FP16_MASK_C = tl.constexpr(FP16_MASK)
FP16_XOR_C = tl.constexpr(FP16_XOR)


@triton.jit
def _join_groups(parts, G: tl.constexpr):
    """G tensors [QK, NV] (G a power of two) -> [QK * NV * G], element (a*G + g)*NV + v from parts[g]
    (only NV == 1 or G == 1 is used: then that is the natural order a*K + n)."""
    cur = parts
    for level in tl.static_range(G.bit_length() - 1):
        nxt = ()
        for i in tl.static_range(G >> (level + 1)):  # the highest remaining bit of g: next axis
            nxt = nxt + (tl.join(cur[i], cur[i + (G >> (level + 1))]),)
        cur = nxt
    return tl.reshape(cur[0], [parts[0].numel * G])


@triton.jit
def _forward(x_ptr, w_ptr, ov_ptr, bp_ptr, last_ptr, T, SHIFT,
             L: tl.constexpr, KB: tl.constexpr, CONSTRAINED: tl.constexpr,
             MUL: tl.constexpr, ADD: tl.constexpr, BYTESUM: tl.constexpr, NORM: tl.constexpr,
             ASM: tl.constexpr, VEC_N: tl.constexpr):
    """Viterbi over one tile (x[(t + SHIFT) % T]): back-pointers into bp[tile, t, a] (rows 1..T-1;
    row 0 gets the last step's), the last step's costs B_{T-1} into last[tile].

    VEC_N: the K successors n of a predecessor class as one [Q/K, K] tensor (few, large ops: the
    interpreter) or K tensors [Q/K, 1] (few registers per thread: the GPU)."""
    K: tl.constexpr = 1 << KB
    Q: tl.constexpr = 1 << (L - KB)
    QK: tl.constexpr = Q // K
    NV: tl.constexpr = K if VEC_N else 1
    PK: tl.constexpr = tl.uint8 if KB == 2 else (tl.uint32 if KB == 3 else tl.uint64)
    tile = tl.program_id(0).to(tl.int64)
    a = tl.arange(0, QK)
    # s*mul + add = (a*K + v)*mul + ((p*Q + g*NV)*mul + add) for s = p*Q + a*K + g*NV + v
    hash_a = (a[:, None] * K + tl.arange(0, NV)[None, :]).to(tl.uint32) * MUL
    m = tl.arange(0, Q)
    if CONSTRAINED:
        ov = tl.load(ov_ptr + tile)
    bs = ()  # bs[p][a] = B[p*QK + a]: zero at the start, +inf off the forced overlap
    for p in tl.static_range(K):
        if CONSTRAINED:
            bs = bs + (tl.where(p * QK + a == ov, 0.0, float("inf")),)
        else:
            bs = bs + (tl.zeros([QK], tl.float32),)
    row = x_ptr + tile * T
    wrow = w_ptr + tile * T
    bprow = bp_ptr + tile * T * QK
    for t in range(0, T):
        j = (t + SHIFT) % T
        xt = tl.load(row + j)
        wt = tl.load(wrow + j)
        # a loop-variant zero (x is finite) keeps the compiler from hoisting 2^L code values
        zero = (xt != xt).to(tl.uint32)
        outs = ()
        pk = tl.zeros([QK, 1], PK)  # the K back-pointers of class a, k bits each (n = 0 lowest)
        for g in tl.static_range(K // NV):  # B_t[a*K + n] = min_p bs[p][a] + err(p*Q + a*K + n)
            for p in tl.static_range(K):
                h = hash_a + (((p * Q + g * NV) * MUL + ADD) % 4294967296 + zero)
                # the code value, rounded exactly as codes.code_values
                if BYTESUM:  # byte sum - 510 as the bits of the float 1.5 * 2^23 + (sum - 510)
                    if ASM:  # one IDP4A on the GPU
                        v = tl.inline_asm_elementwise("dp4a.u32.u32 $0, $1, 16843009, 1262484994;", "=r,r",
                                                      [h], dtype=tl.uint32, is_pure=True, pack=1)
                    else:
                        y = (h & 0x00FF00FF) + ((h >> 8) & 0x00FF00FF)
                        v = (y & 0xFFFF) + (y >> 16) + (0x4B400000 - 510)
                    f = v.to(tl.float32, bitcast=True) - 12582912.0
                else:
                    h = (h & FP16_MASK_C) ^ FP16_XOR_C
                    f = ((h & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                         + (h >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32))
                d = xt - f * NORM
                c = bs[p][:, None] + wt * d * d
                if p == 0:
                    best = c
                    arg = tl.zeros([QK, NV], tl.int32)
                else:  # strict: the lowest p wins ties
                    take = c < best
                    best = tl.where(take, c, best)
                    arg = tl.where(take, p, arg)
            outs = outs + (best,)
            if VEC_N:
                pk = tl.sum(arg.to(PK) << (KB * tl.arange(0, K)[None, :]).to(PK), axis=1, keep_dims=True).to(PK)
            else:
                pk = pk | (arg.to(PK) << (KB * g))
        bflat = _join_groups(outs, K // NV)  # B_t in natural order m
        # row t+1 is read by the backtrace; the last step's row lands in the unused row 0
        tl.store(bprow + ((t + 1) % T) * QK + a, tl.reshape(pk, [QK]))
        # next step's rows: bs[p] = B_t[p*QK : (p+1)*QK], split off bit by bit of p
        rows = (tl.reshape(tl.permute(tl.reshape(bflat, [K, QK]), [1, 0]), [QK] + [2] * KB),)
        for level in tl.static_range(KB):
            lo = ()
            hi = ()
            for i in tl.static_range(1 << level):
                r0, r1 = tl.split(rows[i])
                lo = lo + (r0,)
                hi = hi + (r1,)
            rows = lo + hi
        bs = rows
        if t == T - 1:  # B_{T-1} for _select_end (its p is in bp row 0)
            tl.store(last_ptr + tile * Q + m, bflat)


@triton.jit
def _select_end(bp_ptr, last_ptr, ov_ptr, end_ptr, cost_ptr, T,
                L: tl.constexpr, KB: tl.constexpr, CONSTRAINED: tl.constexpr):
    """The best end state m + p*Q of a tile from B_{T-1}[m] and its p, with numba's tie-breaking."""
    K: tl.constexpr = 1 << KB
    Q: tl.constexpr = 1 << (L - KB)
    tile = tl.program_id(0).to(tl.int64)
    m = tl.arange(0, Q)
    b = tl.load(last_ptr + tile * Q + m)
    p = ((tl.load(bp_ptr + tile * T * (Q // K) + (m >> KB)) >> (KB * (m & (K - 1)))) & (K - 1)).to(tl.int32)
    if CONSTRAINED:  # the end's low L-k bits are the overlap: m = ov
        ov = tl.load(ov_ptr + tile)
        top = tl.min(tl.where(m == ov, b, float("inf")), axis=0)
        pick = tl.max(tl.where(m == ov, m + p * Q, -1), axis=0)
    else:  # numba's argmin order over its transposed layout: n*Q + (s >> k)
        top = tl.min(b, axis=0)
        key = (m & (K - 1)) * Q + p * (Q // K) + (m >> KB)
        pick = tl.min(tl.where(b == top, key, 1 << L), axis=0)
        pick = (pick % Q) * K + pick // Q
    tl.store(end_ptr + tile, pick)
    tl.store(cost_ptr + tile, top)


@triton.jit
def _backtrace(bp_ptr, end_ptr, out_ptr, N, T, STOP,
               L: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr):
    """Follow the back-pointers of BLOCK tiles from their end states down to t = STOP."""
    K: tl.constexpr = 1 << KB
    Q: tl.constexpr = 1 << (L - KB)
    tiles = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = tiles < N
    tiles = tiles.to(tl.int64)
    s = tl.load(end_ptr + tiles, mask=ok, other=0)
    tl.store(out_ptr + tiles * T + T - 1, s, mask=ok)
    for t in range(T - 1, STOP, -1):
        m = s >> KB
        word = tl.load(bp_ptr + (tiles * T + t) * (Q // K) + (m >> KB), mask=ok, other=0)
        j = ((word >> (KB * (m & (K - 1)))) & (K - 1)).to(tl.int32)
        s = m | (j << (L - KB))
        tl.store(out_ptr + tiles * T + t - 1, s, mask=ok)


def _launch(x, w, code: Code, k: int, L: int, shift: int, ov, bp, last, num_warps: int, vec_n: bool):
    """One pass over every tile: forward, end state, backtrace (down to t = shift for the free pass)."""
    N, T = x.shape
    ends = torch.empty(N, dtype=torch.int32, device=x.device)
    costs = torch.empty(N, dtype=torch.float32, device=x.device)
    ov_arg = ov if ov is not None else ends
    _forward[(N,)](x, w, ov_arg, bp, last, T, shift, L=L, KB=k, CONSTRAINED=ov is not None, MUL=code.mul,
                   ADD=code.add, BYTESUM=code.kind == "bytesum", NORM=float(np.float32(code.norm)),
                   ASM=not _interpreted(), VEC_N=vec_n, num_warps=num_warps, enable_fp_fusion=False)
    _select_end[(N,)](bp, last, ov_arg, ends, costs, T, L=L, KB=k, CONSTRAINED=ov is not None)
    states = torch.empty((N, T), dtype=torch.int32, device=x.device)
    block = 128
    _backtrace[(triton.cdiv(N, block),)](bp, ends, states, N, T, shift if ov is None else 0, L=L, KB=k, BLOCK=block)
    return states, costs


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


# warps per program at L = 16 by bits: the fewest SASS instructions per state update without
# register spills (bench/search.py compiles and counts them)
_WARPS_L16 = {2: 32, 3: 8, 4: 8}


def num_warps_for(k: int, L: int) -> int:
    """Warps per program: the L = 16 choice, halved per bit of L less, at least 1."""
    return max(1, _WARPS_L16[k] >> (16 - L))


@torch.no_grad()
def viterbi_tiles_triton(x: torch.Tensor, w, code: str | Code, k: int, L: int, vec_n: bool | None = None):
    """Search N tail-biting sequences of x's device; returns (states int32 [N, T], cost [N]).

    Same result as viterbi_tiles(x, w, code_table(code, L), k, L) with candidates=1. vec_n: see
    _forward (default: vectorised in the interpreter, per-successor tensors on the GPU)."""
    code = get_code(code) if not isinstance(code, Code) else code
    x = x.float().contiguous()
    w = torch.broadcast_to(torch.as_tensor(w, dtype=torch.float32, device=x.device), x.shape).contiguous()
    N, T = x.shape
    Q = 1 << (L - k)
    half = T // 2
    word = {2: torch.uint8, 3: torch.int32, 4: torch.int64}[k]  # K back-pointers of k bits
    chunk = max(1, min(N, _bp_budget(x.device) // (T * (Q >> k) * word.itemsize)))
    bp = torch.empty((chunk, T, Q >> k), dtype=word, device=x.device)
    last = torch.empty((chunk, Q), dtype=torch.float32, device=x.device)
    states = torch.empty((N, T), dtype=torch.int32, device=x.device)
    costs = torch.empty(N, dtype=torch.float32, device=x.device)
    nw = num_warps_for(k, L)
    vec_n = _interpreted() if vec_n is None else vec_n
    for i in range(0, N, chunk):
        xb, wb = x[i : i + chunk], w[i : i + chunk]
        rot, _ = _launch(xb, wb, code, k, L, half, None, bp, last, nw, vec_n)
        # rot[t] is the state at original position (t + half) % T, as in the numba search
        overlap = (rot[:, half] >> k).contiguous()
        states[i : i + chunk], costs[i : i + chunk] = _launch(xb, wb, code, k, L, 0, overlap, bp, last, nw, vec_n)
    return states, costs
