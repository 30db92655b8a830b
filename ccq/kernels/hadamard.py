"""Triton block Hadamard transform with a sign vector: the activation side of incoherence processing.

One program transforms one block of B features of BR rows in registers: log2(B) butterfly
stages (`fwht`, also inlined by the GEMV's fused transform), each viewing the block as
[BR, B/2h, 2, h] and replacing the pair (a, b) by (a+b, a-b).

The launch can also zero a buffer on the side (`zero=`): the fp32 output and ticket counters
of the matmul launches that follow it in stream order, so that no separate zeroing kernel runs
(docs/KERNELS.md, "Launches").
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import launch, sm_count


@triton.jit
def fwht(x, BR: tl.constexpr, B: tl.constexpr, LOGB: tl.constexpr):
    """Unnormalised Walsh-Hadamard transform of each row of x [BR, B] (B = 2**LOGB)."""
    pair = tl.arange(0, 2)
    sign = (1 - 2 * pair).to(tl.float32)
    for st in tl.static_range(LOGB):
        x4 = tl.reshape(x, (BR, B // (2 << st), 2, 1 << st))
        a = tl.sum(x4, axis=2)
        d = tl.sum(x4 * sign[None, None, :, None], axis=2)
        x4 = tl.where((pair == 0)[None, None, :, None], a[:, :, None, :], d[:, :, None, :])
        x = tl.reshape(x4, (BR, B))
    return x


@triton.jit
def sylvester(n: tl.constexpr):
    """The n x n Walsh-Hadamard matrix (Sylvester order), entry (i, j) = (-1) ** popcount(i & j), fp32."""
    i = tl.arange(0, n)[:, None]
    p = i & tl.arange(0, n)[None, :]
    p = p ^ (p >> 8)
    p = p ^ (p >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return (1 - 2 * (p & 1)).to(tl.float32)


@triton.jit
def fwht_mma(x, BR: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr):
    """`fwht` of each row of x [BR, B1 * B2] on tensor cores: column i1 * B2 + i2 of a row held as V [B1, B2],
    H(B) = H(B1) x H(B2), so the transform is H(B1) V H(B2), two matmuls (B1, B2 >= 16). On a GPU the
    products run in tf32 (10-bit mantissa), so only for 16-bit outputs."""
    y = tl.dot(tl.reshape(x, (BR * B1, B2)), sylvester(B2))
    h1 = tl.broadcast_to(sylvester(B1)[None, :, :], (BR, B1, B1))
    return tl.reshape(tl.dot(h1, tl.reshape(y, (BR, B1, B2))), (BR, B1 * B2))


@triton.jit
def pair_index(k):
    """Where the tensor-core GEMV wants the fp16 pair of activation column k: per K step of 128 columns (8
    tiles p of 16 weights c), lane t = p % 4 of an MMA reads tiles t and t + 4 for all 16 c as one run of 64
    values (128 bytes): position 256 * step + 64 * t + 4 * c + 2 * (p // 4), then the pair."""
    p = k % 128 // 16
    return k // 128 * 256 + p % 4 * 64 + k % 16 * 4 + p // 4 * 2


@triton.jit
def pair_scale(m):
    """(2**e, 2**-e) for a block of the activation whose largest magnitude is m: m / 2**e in [2**14, 2**15),
    so fp16 neither overflows nor loses the block's small values; (1, 1) for a (nearly) zero block."""
    ex = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent
    ok = ex >= 15
    return (tl.where(ok, (ex - 14) << 23, 127 << 23).to(tl.float32, bitcast=True),
            tl.where(ok, (268 - ex) << 23, 127 << 23).to(tl.float32, bitcast=True))


@triton.jit
def _hadamard_kernel(x_ptr, s_ptr, y_ptr, n_rows, n_in, x_stride, y_stride, SCALE, zero_ptr, n_zero, xs_ptr,
                     B: tl.constexpr, LOGB: tl.constexpr, BR: tl.constexpr, SIGN_AFTER: tl.constexpr,
                     ZB: tl.constexpr, PAIRS: tl.constexpr, MMA: tl.constexpr):
    """y = H(s * x) (or s * H x) of one [BR, B] block; with ZB > 0 also zero_ptr[ZB * p + 0..ZB) = 0
    (p: the program's linear index, n_zero elements in all): no loop, so the whole kernel stays the hot part.
    PAIRS (for the tensor-core GEMV): y holds every value twice as fp16, divided by a power of two per row
    and block that puts the block's largest magnitude in [2**14, 2**15), at `pair_index` (B >= 128); the
    power goes to xs[row, block]. MMA: the transform on tensor cores (`fwht_mma`, 16-bit y, B >= 256)."""
    if ZB > 0:
        z = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * ZB + tl.arange(0, ZB)
        tl.store(zero_ptr + z, tl.zeros((ZB,), tl.float32), mask=z < n_zero)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * B + tl.arange(0, B)
    rmask = rows[:, None] < n_rows
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * x_stride + cols[None, :], mask=rmask & (cols[None, :] < n_in), other=0)
    x = x.to(tl.float32)
    s = tl.load(s_ptr + cols).to(tl.float32)[None, :]
    if not SIGN_AFTER:
        x = x * s
    if MMA:
        x = fwht_mma(x, BR, 1 << (LOGB // 2), 1 << (LOGB - LOGB // 2)) * SCALE
    else:
        x = fwht(x, BR, B, LOGB) * SCALE
    if SIGN_AFTER:
        x = x * s
    if PAIRS:
        scale, inv = pair_scale(tl.max(tl.abs(x), axis=1))
        xh = (x * inv[:, None]).to(tl.float16)
        tl.store(xs_ptr + rows.to(tl.int64) * tl.num_programs(1) + tl.program_id(1), scale, mask=rows < n_rows)
        dest = pair_index(cols)[None, :]
        tl.store(y_ptr + (r64 * y_stride)[:, :, None] + tl.join(dest, dest + 1), tl.join(xh, xh),
                 mask=rmask[:, :, None])
    else:
        tl.store(y_ptr + r64 * y_stride + cols[None, :], x.to(y_ptr.dtype.element_ty), mask=rmask)


def mma_ok(block: int, rows: int, out_dtype: torch.dtype, pairs: bool) -> bool:
    """Whether a launch transforms on tensor cores: 16-bit output (not the GEMV's fp16 pairs, whose error budget
    is the fp16 rounding alone), both factors of the block >= 16, and 16+ rows per matmul."""
    return (out_dtype in (torch.float16, torch.bfloat16) and not pairs and block >= 256
            and rows * (1 << (block.bit_length() - 1) // 2) >= 16)


def transform(x: torch.Tensor, signs: torch.Tensor, block: int, out_dtype: torch.dtype = torch.float32,
              sign_after: bool = False, zero: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., n] (n <= len(signs), zero padded) -> H (s * x) or, with sign_after, s * (H x); [..., len(signs)].

    zero: a contiguous fp32 buffer the same launch fills with zeros (x must have rows)."""
    return _transform(x, signs, block, out_dtype, sign_after, zero)[0]


def transform_pairs(x: torch.Tensor, signs: torch.Tensor, block: int, zero: torch.Tensor | None = None):
    """H(s * x) of x [rows, n] for the tensor-core GEMV: (fp16 [rows, 2 * len(signs)], every value twice at
    `pair_index`, and fp32 [rows, len(signs) // block], the power of two each block was divided by)."""
    return _transform(x, signs, block, torch.float16, False, zero, pairs=True)


def _transform(x, signs, block, out_dtype, sign_after, zero, pairs=False):
    n_pad = signs.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, n_pad * (2 if pairs else 1), dtype=out_dtype, device=x.device)
    xs = torch.empty(rows, n_pad // block, dtype=torch.float32, device=x.device) if pairs else y
    if zero is not None and (not rows or zero.dtype != torch.float32 or not zero.is_contiguous()):
        raise ValueError("transform: zero= needs rows to transform and a contiguous fp32 buffer")
    if rows:
        br = max(1, min(triton.next_power_of_2(rows), 4096 // block, 16))
        while br > 1 and triton.cdiv(rows, br) * (n_pad // block) < sm_count(x.device):
            br //= 2  # a few rows: more programs of fewer rows rather than a few SMs doing all of it
        grid = (triton.cdiv(rows, br), n_pad // block)
        n_zero = zero.numel() if zero is not None else 0
        zb = triton.next_power_of_2(triton.cdiv(n_zero, grid[0] * grid[1])) if n_zero else 0
        launch(_hadamard_kernel, grid, x2, signs, y, rows, x2.shape[1], x2.stride(0), y.stride(0), block ** -0.5,
               zero if n_zero else y, n_zero, xs, B=block, LOGB=int(math.log2(block)), BR=br, SIGN_AFTER=sign_after,
               ZB=zb, PAIRS=pairs, MMA=mma_ok(block, br, out_dtype, pairs))
    if pairs:
        return y, xs
    return y.reshape(*lead, n_pad), None
