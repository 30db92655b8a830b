"""Triton trellis decode: the value of every weight from its L-bit window, in registers.

Two ways to find a weight's state, both exact:
- runs (every kernel by default): a thread owns whole tile-row runs (16 weights along K); it loads
  the run's BITS+1 words once (`run_history_offsets`, `run_strings`) and cuts each of the 16
  windows with a compile-time shift (`run_window`);
- gather (`window_offsets` + `decode_at`): every weight loads the two 16-bit words holding its
  window (random access; the GEMM variant the benchmark compares against).
`code_value` then evaluates the computed code with 32-bit integer ops (the multiply wraps mod
2**32, as the format says), with inline PTX on a GPU (dp4a, lop3 + fp16 conversions) and a
pure-Triton twin in the interpreter. The result is the unscaled code value; callers fold
``norm * scale[row]`` in after the reduction, which saves one multiply per weight.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..codec.codes import get_code
from .launch import launch


@triton.jit
def window_offsets(rows, cols, KT, BITS: tl.constexpr, L: tl.constexpr):
    """Word offsets and shift of the window of W'[rows, cols] (cols inside one K block).

    Computed once per kernel: moving the block by k0 columns (a multiple of 16) only moves
    every tile by k0/16 tiles, i.e. adds (k0/16)*16*BITS words to both offsets.
    """
    NW: tl.constexpr = 16 * BITS
    NBITS: tl.constexpr = 256 * BITS
    tile = ((rows // 16) * KT + cols // 16) * NW
    t = (rows % 16) * 16 + cols % 16
    start = ((t + 1) * BITS - L + NBITS) % NBITS  # window of weight t: bits [end - L, end), circular
    word = start // 16
    return tile + word, tile + (word + 1) % NW, (32 - L - start % 16).to(tl.uint32)


# Triton's interpreter cannot run inline PTX: there the kernels take the pure-Triton twin of each asm helper.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "") == "1")


@triton.jit
def byte_sum_bits(x):
    """uint32 bits of the fp32 number 2**23 + (sum of the four bytes of x): one dp4a on a GPU."""
    if INTERPRET:
        y = (x & 0x00FF00FF) + ((x >> 8) & 0x00FF00FF)  # byte pairs summed in two 16-bit lanes
        return ((y + (y >> 16)) & 0xFFFF) | 0x4B000000
    else:
        return tl.inline_asm_elementwise("dp4a.u32.u32 $0, $1, 16843009, 1258291200;", "=r,r", [x],
                                         dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def fp16_pair_sum(x):
    """fp32 sum of the two fp16 halves of (x & 0x8FFF8FFF) ^ 0x3B603B60 (exact: both are 0.125..2 in size).

    On a GPU one lop3, two fp16->fp32 conversions of the halves in place and one add."""
    if INTERPRET:
        x = (x & 0x8FFF8FFF) ^ 0x3B603B60
        lo = (x & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (x >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo + hi
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; .reg .b16 l, h; .reg .f32 a, b;\n"
            "lop3.b32 t, $1, 0x8FFF8FFF, 0x3B603B60, 0x6a;\n"  # (x & mask) ^ xor
            "mov.b32 {l, h}, t; cvt.f32.f16 a, l; cvt.f32.f16 b, h; add.f32 $0, a, b; }",
            "=f,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def code_value(state, MUL: tl.constexpr, ADD: tl.constexpr, FP16SUM: tl.constexpr):
    """Unscaled value (fp32) of uint32 states under a computed code."""
    x = state * MUL + ADD  # uint32: wraps mod 2**32
    if FP16SUM:
        v = fp16_pair_sum(x)
    else:
        # byte sum 0..1020 as fp32 without a conversion instruction: 2**23 + y as fp32 bits, minus 2**23 + 510
        v = byte_sum_bits(x).to(tl.float32, bitcast=True) - 8389118.0
    return v


@triton.jit
def decode_at(tr_ptr, off0, off1, shift, mask, L: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
              FP16SUM: tl.constexpr):
    """Unscaled code values (fp32) of the weights whose windows `window_offsets` located."""
    w0 = tl.load(tr_ptr + off0, mask=mask, other=0).to(tl.uint16).to(tl.uint32)
    w1 = tl.load(tr_ptr + off1, mask=mask, other=0).to(tl.uint16).to(tl.uint32)
    state = (((w0 << 16) | w1) >> shift) & ((1 << L) - 1)
    return code_value(state, MUL, ADD, FP16SUM)


@triton.jit
def run_history_offsets(rows, tiles, KT, BITS: tl.constexpr):
    """Offsets [rows, tiles] of the history word of each run: the word before the tile row's BITS
    new words (circularly; the row's own words follow it). Add t0 * 16 * BITS to move by t0 tiles."""
    NW: tl.constexpr = 16 * BITS
    return ((rows // 16)[:, None] * KT + tiles[None, :]) * NW + ((rows % 16)[:, None] * BITS - 1 + NW) % NW


@triton.jit
def run_strings(tr_ptr, offs0, mask, BITS: tl.constexpr):
    """The words of each run as uint64 strings, MSB first: a = words 0..3, b = words 1..4 (4 bits; else a).

    offs0: `run_word_offsets(.., 0, ..)`; word q sits at offs0 + q except the history word of tile
    row 0, which wraps to the tile's last word (offs0 - 1 + 16 * BITS); each word is loaded once."""
    NW: tl.constexpr = 16 * BITS
    a = tl.load(tr_ptr + offs0, mask=mask, other=0).to(tl.uint16).to(tl.uint64) << 48
    nxt = offs0 + 1 - tl.where((offs0 % NW) == NW - 1, NW, 0)  # word 1 of the run (row's first word)
    for q in tl.static_range(1, 4):
        if q <= BITS:
            w = tl.load(tr_ptr + nxt + (q - 1), mask=mask, other=0)
            a = a | (w.to(tl.uint16).to(tl.uint64) << (48 - 16 * q))
    b = a
    if BITS == 4:
        b = (a << 16) | tl.load(tr_ptr + nxt + 3, mask=mask, other=0).to(tl.uint16).to(tl.uint64)
    return a, b


@triton.jit
def run_window(a, b, C: tl.constexpr, BITS: tl.constexpr, L: tl.constexpr):
    """State (uint32) of weight C (0..15) of each run from its strings a (words 0..3) and b (words 1..4).

    Window C is stream bits [E - L, E) of the run with E = 16 + BITS * (C + 1), a compile-time
    constant: one funnel shift and one mask per weight."""
    E: tl.constexpr = 16 + BITS * (C + 1)
    if E <= 64:
        st = a >> (64 - E)
    else:
        st = b >> (80 - E)
    return (st & ((1 << L) - 1)).to(tl.uint32)


def code_params(qt) -> dict:
    """The constexpr code arguments (BITS, L, MUL, ADD, FP16SUM) of the kernels for a quantized tensor."""
    code = get_code(qt.code)
    return dict(BITS=qt.bits, L=qt.L, MUL=code.mul, ADD=code.add, FP16SUM=code.kind == "fp16sum")


def code_norm(qt) -> float:
    return float(torch.tensor(get_code(qt.code).norm, dtype=torch.float32))


@triton.jit
def _dequant_kernel(tr_ptr, sc_ptr, out_ptr, N, K, KT, NORM, tr_estride, sc_estride, out_estride,
                    BITS: tl.constexpr, L: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
                    FP16SUM: tl.constexpr, BN: tl.constexpr, J: tl.constexpr):
    """W'[rows, tiles] of one expert: each thread decodes whole runs and writes their 16 weights."""
    e = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    tiles = tl.program_id(1) * J + tl.arange(0, J)
    mask = (rows < N)[:, None] & (tiles < KT)[None, :]
    a, b = run_strings(tr_ptr + e * tr_estride, run_history_offsets(rows, tiles, KT, BITS), mask, BITS)
    sc = (tl.load(sc_ptr + e * sc_estride + rows, mask=rows < N, other=0).to(tl.float32) * NORM)[:, None]
    out = out_ptr + e * out_estride + rows[:, None] * K + 16 * tiles[None, :]
    for c in tl.static_range(16):
        w = code_value(run_window(a, b, c, BITS, L), MUL, ADD, FP16SUM) * sc
        tl.store(out + c, w.to(out_ptr.dtype.element_ty), mask=mask)


def rotated_weight(qt, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W' = scales * code(states) ([*E, out_pad, in_pad]), decoded by the Triton kernel."""
    tr = qt.trellis.contiguous()
    lead = tr.shape[:-3]
    ot, it = tr.shape[-3], tr.shape[-2]
    N, K = ot * 16, it * 16
    E = 1
    for d in lead:
        E *= d
    out = torch.empty(*lead, N, K, dtype=dtype, device=tr.device)
    BN, J = 32, 8
    grid = (triton.cdiv(N, BN), triton.cdiv(it, J), E)
    launch(_dequant_kernel, grid, tr, qt.scales.contiguous(), out, N, K, it, code_norm(qt), ot * it * 16 * qt.bits,
           N, N * K, BN=BN, J=J, num_warps=1, **code_params(qt))
    return out


def dequantize(qt, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton twin of `reference.dequantize`: decode W', then undo the rotations."""
    from .hadamard import transform

    w = rotated_weight(qt)
    if qt.signs_out is not None:
        w = transform(w.transpose(-1, -2), qt.signs_out, qt.had_out, sign_after=True).transpose(-1, -2)
    w = transform(w, qt.signs_in, qt.had_in, sign_after=True)
    out, inp = qt.shape[-2:]
    return w[..., :out, :inp].to(dtype).contiguous()
