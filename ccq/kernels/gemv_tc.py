"""Tensor-core GEMV for a few rows (batch-1 decode): each decoded weight goes straight into an MMA operand.

The CUDA-core GEMV (`gemm._gemv_kernel`) spends about 7 SASS instructions per weight: window
(2), hash (1 IMAD), code (1 dp4a or lop3), then a conversion to fp32 and an FFMA. Here the code's
output register *is* the operand: `dp4a(x, 0x01010101, 0xE5FE6400)` yields the exact fp16 pair
(1024 + s, -1534) and the fp16-sum codes' `lop3` the exact pair (lo, hi); both sum to the code value
(s - 510, lo + hi). Taken as two K entries of an m16n8k16 MMA whose other operand holds the
activation twice, they give x * value with fp32 accumulation and no conversion, so a weight costs
window (1.5: two windows from one funnel shift) + hash + code = 3.5 instructions plus a quarter MMA
(docs/KERNELS.md).

Layout (Gluon, so the operand layout is exact and nothing moves between threads): weights are
MMA operand A (16 rows x 8 weights per MMA); MMA number c of a K step takes weight c of the runs of
8 tiles (A's K slot p <-> tile p), so a thread cuts all 16 windows of its 4*MT runs with compile-time
shifts. Its MMA rows stand for consecutive output rows, so their words arrive in one vector load and
each row's history word is the row before's last word. Operand B is the activation,
8 token columns (rows past M repeat the last one and are never stored), read as fp16 pairs written
by the input transform (`hadamard.transform_pairs`) with one power-of-two scale per
(token, Hadamard block) to keep fp16 in range; a block's partial sum is scaled into the fp32 total.
With 32 columns (17-64 rows, in blocks of 32) each weight's B operand is loaded right before its MMAs and the total is
rescaled from block to block instead (`_step_wide`).

Gluon has no interpreter: under `TRITON_INTERPRET=1` the same kernel source runs as a Triton kernel
with its layouts erased (`_interpreted`), the MMA as a `tl.dot` and the inline PTX as its pure-Triton
twin, so the CPU tests check every index of the kernel; `tests/test_sass.py` compiles the real one.
"""

from __future__ import annotations

import math
import os
import types

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakTensorKeyDictionary
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .decode import code_norm, code_params
from .hadamard import pair_index, pair_scale
from .launch import launch, sm_count

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
MAX_ROWS = 64  # dense: 8, 16 or 32 token columns (the MMA's N), 33-64 rows in two blocks of 32; beyond, the GEMM
MOE_MAX_TOKENS = 8  # beyond, the sorted GEMM decodes each used expert fewer times than one program per slot
MIN_BLOCK = 128  # a K step (8 tiles) must lie inside one Hadamard block of the activation scales
MT, WARPS = 2, 4  # 16-row blocks per warp, warps per program: 128 outputs per program
# 32 columns: about 200 registers; left to itself ptxas capped sm_80's 4-bit kernel at 168 and spilled
WIDE_MAXNREG = 232
# one launch at <= 8 rows (the transform in the prologue): left to itself ptxas gave sm_80 80 registers and a
# spill in the loop; with this cap 99 (sm_90: 106, 3.96 instructions per weight in the loop against 3.99);
# the sorted MoE's down launch too (96 registers and 8 bytes of stack without it; its gate_up launch spills
# on sm_80 under the cap and takes 130-150 without it)
FUSED_MAXNREG = 128
FUSED_MIN_BLOCK = 256  # the prologue's MMAs want both factors of the Hadamard block >= 16 (`_transform_slice`)
# elements all programs' prologues transform together, at most: about 70 instructions each (279 per thread and
# 512-block), so 2**20 of them issue in about one launch's time (2 us) on an H200; beyond, two launches are cheaper
FUSED_MAX_ELEMENTS = 1 << 20
MOE_BM1 = 32  # outputs per program of the MoE's gate_up launch (no K split there: SwiGLU needs whole sums)
SORTED_MAX_PAIRS = 64  # pairs per expert on average up to which the sorted launches replace the GEMM


@gluon.jit
def _pairs(x, FP16SUM: gl.constexpr):
    """fp16 pairs summing to the code value of the hashed states x (each state twice, adjacent)."""
    if FP16SUM:
        return gl.inline_asm_elementwise("lop3.b32 $0, $1, 0x8FFF8FFF, 0x3B603B60, 0x6a;", "=r,r,r", [x],
                                         dtype=gl.float16, is_pure=True, pack=2)
    else:  # 0xE5FE6400: fp16 (-1534 | 1024); the byte sum s lands in the low half: (1024 + s, -1534)
        return gl.inline_asm_elementwise("dp4a.u32.u32 $0, $1, 16843009, 3858654208;", "=r,r,r", [x],
                                         dtype=gl.float16, is_pure=True, pack=2)


@gluon.jit
def _last_to_arrive(counter_ptr, n):
    """As `gemm._last_to_arrive`: barrier, then one acq_rel ticket; true for the n-th program."""
    gl.barrier()
    return gl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == n - 1


@gluon.jit
def _pointers(tr_ptr, tr32_ptr, rows, tiles, k, KT, LAST, BITS: tl.constexpr):
    """Pointers of the first K step's words of each group (rows: its first row, J consecutive rows in one
    tile row): its first row's history word (int16: the word before the own ones, circularly) [groups, 8]
    and its own words [groups, 8, k] (`_registers`). Rows past LAST are moved into LAST's tile row (valid
    memory; their results are never stored)."""
    NW: tl.constexpr = 16 * BITS
    r = (rows % 16)[:, None]
    own = ((gl.minimum(rows // 16, LAST // 16))[:, None] * KT + tiles[None, :]) * NW + r * BITS
    hist_p = tr_ptr + own - 1 + gl.where(r == 0, NW, 0)
    if BITS == 3:
        return hist_p, tr_ptr + own[:, :, None] + 3 * k[None, None, :]
    else:
        return hist_p, tr32_ptr + (own // 2)[:, :, None] + k[None, None, :]


@gluon.jit
def _by_row(x, J: tl.constexpr, LR: tl.constexpr):
    """The J (2 or 4) entries of x's last axis, one tensor each in layout LR (J = 2: repeated)."""
    if J == 2:
        a, b = gl.split(x)
        c, d = a, b
    else:
        e, o = gl.split(gl.reshape(x, [x.shape[0], x.shape[1], 2, 2]))
        a, c = gl.split(e)
        b, d = gl.split(o)
    return _lb(a, LR), _lb(b, LR), _lb(c, LR), _lb(d, LR)


@gluon.jit
def _rot(u):
    """An int32 of words w0 (low half) and w1 as the MSB-first string w0:w1 (a rotation by 16)."""
    return (u << 16) | (u >> 16)


@gluon.jit
def _load_tiles(p, off, HALF: tl.constexpr, LT: tl.constexpr):
    """The words at p + off ([groups, 4 tiles (, k)]) and at HALF words on (tiles + 4), in layout LT
    ([groups, 8 tiles (, k)]): the second load takes the first's address plus a constant."""
    a = gl.load(p + off)
    x = gl.join(a, gl.load(p + off + HALF))
    if len(a.shape) == 2:
        x = gl.reshape(gl.permute(x, [0, 2, 1]), [a.shape[0], 8])
    else:
        x = gl.reshape(gl.permute(x, [0, 3, 1, 2]), [a.shape[0], 8, a.shape[2]])
    return _lb(x, LT)


@gluon.jit
def _registers(hist_p, own_p, t0, BITS: tl.constexpr, J: tl.constexpr, LO: tl.constexpr):
    """The strings of a thread's J consecutive rows (x its 2 tiles) for the K step at tile t0, one (r0, r1, r2)
    per row: the history word (MSB) then the own words as 32-bit registers, r0 least significant (bits past
    the string are junk no window reads). One load of the group's own words and one of its first row's
    history word: row j's history is row j-1's last own word, already in a register. hist_p: pointers of
    the groups' history words [groups, 8]; own_p: of their own words [groups, 8, J * (1 | 2)] (int32 at 2 and 4
    bits) or of each row's first word [groups, 8, J] (int16 at 3 bits)."""
    NW: tl.constexpr = 16 * BITS
    LR: tl.constexpr = gl.SliceLayout(2, LO)
    h = _load_tiles(hist_p, t0 * NW, 4 * NW, LR).to(gl.uint16).to(gl.uint32)
    if BITS == 2:  # row j: one int32 (w0 low, w1 high): r0 = w0:w1, r1 = hist (low half)
        u = _by_row(_load_tiles(own_p, t0 * (NW // 2), 2 * NW, LO).to(gl.uint32), J, LR)
        r0 = (_rot(u[0]), _rot(u[1]), _rot(u[2]), _rot(u[3]))
        return ((r0[0], h, h), (r0[1], r0[0], r0[0]), (r0[2], r0[1], r0[1]), (r0[3], r0[2], r0[2]))
    elif BITS == 4:  # row j: two int32s (w0:w1, w2:w3 low first): r0 = w2:w3, r1 = w0:w1, r2 = hist
        u = _load_tiles(own_p, t0 * (NW // 2), 2 * NW, LO).to(gl.uint32)
        u0, u1 = gl.split(gl.reshape(u, [u.shape[0], u.shape[1], J, 2]))
        a = _by_row(u0, J, LR)
        b = _by_row(u1, J, LR)
        r0 = (_rot(b[0]), _rot(b[1]), _rot(b[2]), _rot(b[3]))
        return ((r0[0], _rot(a[0]), h), (r0[1], _rot(a[1]), r0[0]), (r0[2], _rot(a[2]), r0[1]),
                (r0[3], _rot(a[3]), r0[2]))
    else:  # row j: three int16 words: r0 = w1:w2, r1 = hist:w0
        w0 = _by_row(_load_tiles(own_p, t0 * NW, 4 * NW, LO).to(gl.uint16).to(gl.uint32), J, LR)
        w1 = _by_row(_load_tiles(own_p, t0 * NW + 1, 4 * NW, LO).to(gl.uint16).to(gl.uint32), J, LR)
        w2 = _by_row(_load_tiles(own_p, t0 * NW + 2, 4 * NW, LO).to(gl.uint16).to(gl.uint32), J, LR)
        r1 = ((h << 16) | w0[0], (w2[0] << 16) | w0[1], (w2[1] << 16) | w0[2], (w2[2] << 16) | w0[3])
        return (((w1[0] << 16) | w2[0], r1[0], r1[0]), ((w1[1] << 16) | w2[1], r1[1], r1[1]),
                ((w1[2] << 16) | w2[2], r1[2], r1[2]), ((w1[3] << 16) | w2[3], r1[3], r1[3]))


@gluon.jit
def _funnel(r0, r1, r2, p: tl.constexpr):
    """String bits [p, p + 32) as one register: a funnel shift (nothing where p is a multiple of 32)."""
    if p // 32 == 0:
        lo = r0
        hi = r1
    else:
        lo = r1
        hi = r2
    if p % 32 == 0:
        return lo
    else:
        return ((hi.to(gl.uint64) << 32 | lo.to(gl.uint64)) >> (p % 32)).to(gl.uint32)


@gluon.jit
def _window(r0, r1, r2, c: tl.constexpr, BITS: tl.constexpr, L: tl.constexpr):
    """Window c of the run: string bits [p, p + L), p = BITS * (15 - c). Windows pair up as (p, p + 32 - L)
    when both exist: one funnel holds both, the low one is a mask away and the high one a shift (whose zero
    fill is the mask), 1.5 instructions a window instead of 2."""
    p: tl.constexpr = BITS * (15 - c)
    D: tl.constexpr = 32 - L
    if (D % BITS == 0) & ((p // D) % 2 == 1):  # the high one of a pair
        return _funnel(r0, r1, r2, p - D) >> D
    else:
        return _funnel(r0, r1, r2, p) & ((1 << L) - 1)


@triton.constexpr_function
def _half_tiles(own):
    """`own_layout` over tiles 0..3 (the loads of `_load_tiles`)."""
    return gl.DistributedLinearLayout(reg_bases=[b for b in own.reg_bases if b[1] == 0], lane_bases=own.lane_bases,
                                      warp_bases=own.warp_bases, block_bases=[],
                                      shape=[own.shape[0], 4, own.shape[2]])


@triton.constexpr_function
def _log2(n):
    return n.bit_length() - 1


@gluon.jit
def _hash(r, c: tl.constexpr, BITS: tl.constexpr, L: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
          BY_IMAD: tl.constexpr):
    """state * MUL + ADD of window c of the run with registers r. BY_IMAD (the fp16-sum codes, whose lop3
    loads the integer pipe) and no ADD: a 16-bit window that is the low one of its funnel f skips the mask,
    as (f & 0xFFFF) * MUL = f * MUL - (f >> 16) * (MUL << 16) mod 2**32, two IMADs on the FMA pipe sharing
    f >> 16 with the pair's high window (with an ADD, ptxas rematerialises the second constant each time)."""
    p: tl.constexpr = BITS * (15 - c)
    if BY_IMAD & (ADD == 0) & (L == 16) & ((p // 16) % 2 == 0) & (16 % BITS == 0):
        f = _funnel(r[0], r[1], r[2], p)
        return f * MUL + ((f >> 16) * _wrap(-(MUL << 16)) + ADD)
    else:
        return _window(r[0], r[1], r[2], c, BITS, L) * MUL + ADD


@triton.constexpr_function
def _wrap(n):
    return n % (1 << 32)


@triton.constexpr_function
def _order(i, bits, L):
    """The window of MMA number i of a K step: a pair's two windows (`_window`) one after the other, so their
    funnel dies at once (held over 8 MMAs, ptxas computes it twice)."""
    d = 32 - L
    g = d // bits  # windows per band
    if d % bits or 16 % (2 * g):
        return i
    return i // 2 // g * 2 * g + i // 2 % g + i % 2 * g


@gluon.jit
def _a_of(rr, c: tl.constexpr, BITS: tl.constexpr, L: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
          FP16SUM: tl.constexpr, J: tl.constexpr, W: tl.constexpr, LA: tl.constexpr):
    """Operand A of MMA c of a K step: weight c of every run (A's K slot p: tile p), as fp16 pairs."""
    st = gl.join(_hash(rr[0], c, BITS, L, MUL, ADD, FP16SUM), _hash(rr[1], c, BITS, L, MUL, ADD, FP16SUM))
    if J == 4:
        st = gl.join(st, gl.join(_hash(rr[2], c, BITS, L, MUL, ADD, FP16SUM),
                                 _hash(rr[3], c, BITS, L, MUL, ADD, FP16SUM)))
    return _pairs(_a_operand(gl.join(st, st), J, W, LA), FP16SUM)


@gluon.jit
def _step(rr, xb, part, BITS: tl.constexpr, L: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
          FP16SUM: tl.constexpr, J: tl.constexpr, W: tl.constexpr, LA: tl.constexpr):
    """part += the 16 MMAs of one K step: MMA c (`_a_of`) against the activations of columns 16p + c of the
    step (B = xb[c], from `_operands`). rr: `_registers`."""
    for i in gl.static_range(16):
        part = mma_v2(_a_of(rr, _order(i, BITS, L), BITS, L, MUL, ADD, FP16SUM, J, W, LA), xb[_order(i, BITS, L)],
                      part)
    return part


@gluon.jit
def _step_wide(rr, xp, acc, BITS: tl.constexpr, L: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
               FP16SUM: tl.constexpr, J: tl.constexpr, W: tl.constexpr, LA: tl.constexpr, LB: tl.constexpr):
    """acc += the 16 MMAs of one K step with 32 token columns: as `_step`, but MMA c's B operand is
    loaded when it is used (xp: the step's pointers [NT, 4, 4], `_b_wide`), as all 16 would not fit in
    registers; each decoded A operand feeds NT / 8 MMAs."""
    for i in gl.static_range(16):
        b = _b_wide(gl.load(xp + 4 * _order(i, BITS, L)), LB)
        acc = mma_v2(_a_of(rr, _order(i, BITS, L), BITS, L, MUL, ADD, FP16SUM, J, W, LA), b, acc)
    return acc


@gluon.jit
def _b_wide(v, LB: tl.constexpr):
    """B [16 (K: tile p, twice), NT] of one weight c from v [NT tokens, 4 (tile % 4), 4 (tile // 4, twice)]: lane
    t's 8 contiguous bytes per token are the pairs of tiles t and t + 4 (`pair_index`). Register-only."""
    v = gl.permute(gl.reshape(v, [v.shape[0], 4, 2, 2]), [2, 1, 3, 0])  # (tile // 4, tile % 4, twice, token)
    return _lb(gl.reshape(v, [16, v.shape[3]]), LB)


@gluon.jit
def _a_operand(x, J: tl.constexpr, W: tl.constexpr, LA: tl.constexpr):
    """[groups = 8 W, 8 tiles, 2 (j0) (, 2 (j1)), 2 (pair)] -> A [16 J W / 2 rows, 16]: MMA row
    m = 16 W j1 + 16 w + 8 j0 + i (group 8 w + i, its row j0 + 2 j1; `_mma_rows`), K slot 2 tile + pair.
    Register-only reshapes and a permute: the result is A's layout exactly."""
    if J == 4:
        x = gl.permute(gl.reshape(x, [W, 8, 8, 2, 2, 2]), [4, 0, 3, 1, 2, 5])
    else:
        x = gl.permute(gl.reshape(x, [W, 8, 8, 2, 2]), [0, 3, 1, 2, 4])
    return gl.convert_layout(gl.reshape(x, [8 * J * W, 16]), LA, assert_trivial=True)


@gluon.jit
def _mma_rows(m, J: tl.constexpr, W: tl.constexpr):
    """The output row (within the program's block) of MMA row m (`_a_operand`): thread-consecutive rows."""
    return J * (8 * ((m // 16) % W) + m % 8) + (m // 8) % 2 + 2 * (m // (16 * W))


@gluon.jit
def _operands(v, LB: tl.constexpr, NT: tl.constexpr):
    """The 16 B operands [16 (K: tile p, twice), 8 (tokens)] of a K step from v [8 tokens, 4, 64]: lane t
    holds the pairs of tiles t and t + 4 for all 16 weights c, 128 contiguous bytes (`pair_index`). Only
    reshapes, a permute and splits of registers: each result is B's layout exactly (no data moves)."""
    v = gl.permute(gl.reshape(v, [NT, 4, 16, 2, 2]), [3, 1, 4, 0, 2])  # (tile // 4, tile % 4, half, token, c)
    v = gl.reshape(v, [16, NT, 2, 2, 2, 2])  # (k, token, c3, c2, c1, c0): c = 8 c3 + 4 c2 + 2 c1 + c0
    s0, s1 = gl.split(v)  # s{c0}{c1}{c2}: split takes the last dimension
    s00, s01 = gl.split(s0)
    s10, s11 = gl.split(s1)
    s000, s001 = gl.split(s00)
    s010, s011 = gl.split(s01)
    s100, s101 = gl.split(s10)
    s110, s111 = gl.split(s11)
    a000, b000 = gl.split(s000)  # a: c3 = 0, b: c3 = 1
    a001, b001 = gl.split(s001)
    a010, b010 = gl.split(s010)
    a011, b011 = gl.split(s011)
    a100, b100 = gl.split(s100)
    a101, b101 = gl.split(s101)
    a110, b110 = gl.split(s110)
    a111, b111 = gl.split(s111)
    return (_lb(a000, LB), _lb(a100, LB), _lb(a010, LB), _lb(a110, LB), _lb(a001, LB), _lb(a101, LB),
            _lb(a011, LB), _lb(a111, LB), _lb(b000, LB), _lb(b100, LB), _lb(b010, LB), _lb(b110, LB),
            _lb(b001, LB), _lb(b101, LB), _lb(b011, LB), _lb(b111, LB))


@gluon.jit
def _lb(x, LB: tl.constexpr):
    return gl.convert_layout(x, LB, assert_trivial=True)


@gluon.jit
def _hadamard(n: tl.constexpr, layout: tl.constexpr):
    """The n x n Walsh-Hadamard matrix (Sylvester order), entry (i, j) = (-1) ** popcount(i & j)."""
    i = gl.arange(0, n, layout=gl.SliceLayout(1, layout))[:, None]
    j = gl.arange(0, n, layout=gl.SliceLayout(0, layout))[None, :]
    p = i & j
    p = p ^ (p >> 8)
    p = p ^ (p >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return (1 - 2 * (p & 1)).to(gl.float32)


@gluon.jit
def _write_pairs(v, hr_ptr, hs_ptr, off):
    """Store v (a block of the activation, columns off) as `hadamard.transform_pairs` does: v / 2**e twice as
    fp16 at hr_ptr + pair_index(off), with 2**e (`pair_scale` of the block's largest magnitude) at hs_ptr."""
    scale, inv = pair_scale(gl.max(gl.max(gl.abs(v), axis=1), axis=0))
    vh = (v * inv).to(gl.float16)
    dest = pair_index(off)
    gl.store(hr_ptr + gl.join(dest, dest + 1), gl.join(vh, vh))
    gl.store(hs_ptr, scale)


@gluon.jit
def _had_row(y_ptr, s_ptr, out_ptr, hs_ptr, g, N, SCALE, HAD: tl.constexpr, HAD1: tl.constexpr,
             HAD_L: tl.constexpr):
    """Down's input from one row y of launch 1 (MoE): H(s * y) * SCALE of its Hadamard block g, held as
    [HAD1, HAD2] (column i1 * HAD2 + i2; H = H(HAD1) x H(HAD2) in Sylvester order, two small FMA matmuls),
    written as scaled pairs into out and its scale into hs[g]."""
    HAD2: tl.constexpr = HAD // HAD1
    i1 = gl.arange(0, HAD1, layout=gl.SliceLayout(1, HAD_L))
    i2 = gl.arange(0, HAD2, layout=gl.SliceLayout(0, HAD_L))
    cols = g * HAD + i1[:, None] * HAD2 + i2[None, :]
    v = gl.load(y_ptr + cols, mask=cols < N, other=0, cache_modifier=".cg")
    v = v * gl.load(s_ptr + cols).to(gl.float32)
    a_l: gl.constexpr = gl.DotOperandLayout(0, HAD_L, 0)
    b_l: gl.constexpr = gl.DotOperandLayout(1, HAD_L, 0)
    zero = gl.zeros([HAD1, HAD2], gl.float32, HAD_L)
    v = gl.dot_fma(gl.convert_layout(v, a_l), gl.convert_layout(_hadamard(HAD2, HAD_L), b_l), zero)
    v = gl.dot_fma(gl.convert_layout(_hadamard(HAD1, HAD_L), a_l), gl.convert_layout(v, b_l), zero)
    _write_pairs(v * SCALE, out_ptr, hs_ptr + g, cols)


@gluon.jit
def _transform_slice(x_ptr, x_stride, s_ptr, xd_ptr, xd_stride, xs_ptr, xs_stride, M, K_IN, t_lo, t_hi, SCALE,
                     HAD: tl.constexpr, HAD1: tl.constexpr, W: tl.constexpr):
    """The one-launch dense GEMV's prologue: H(s * x) * SCALE of every Hadamard block that tiles t_lo..t_hi
    touch, for all M rows of x, written as `hadamard.transform_pairs` writes them (pairs into xd, scales into
    xs). On tensor cores: a block held as V [HAD1, HAD2] (column i1 * HAD2 + i2) is H(HAD1) V H(HAD2), two
    fp16 MMAs (warps split the HAD2 columns; HAD1, HAD2 >= 16), V scaled by a power of two so that H(HAD1) V stays
    below 2**15. Programs of the same K slice write the same values; the barrier orders this program's writes
    before its own loop reads them."""
    HAD2: tl.constexpr = HAD // HAD1
    TB: tl.constexpr = HAD // 16  # tiles per block
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, W], instr_shape=[16, 8])
    la: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    lb: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    h1 = gl.convert_layout(_hadamard(HAD1, mma).to(gl.float16), la)
    h2 = gl.convert_layout(_hadamard(HAD2, mma).to(gl.float16), lb)
    at = (gl.arange(0, HAD1, layout=gl.SliceLayout(1, mma)) * HAD2)[:, None] + \
        gl.arange(0, HAD2, layout=gl.SliceLayout(0, mma))[None, :]
    zero = gl.zeros([HAD1, HAD2], gl.float32, mma)
    b_lo = t_lo // TB
    nb = (t_hi + TB - 1) // TB - b_lo
    for i in range(M * nb):
        r = i // nb
        cols = (b_lo + i % nb) * HAD + at
        v = gl.load(x_ptr + r * x_stride + cols, mask=cols < K_IN, other=0).to(gl.float32)
        v = v * gl.load(s_ptr + cols).to(gl.float32)
        sc, inv = pair_scale(gl.max(gl.max(gl.abs(v), axis=1), axis=0) * HAD1)  # |v * inv| < 2**15 / HAD1
        q = mma_v2(h1, gl.convert_layout((v * inv).to(gl.float16), lb), zero)
        v = mma_v2(gl.convert_layout(q.to(gl.float16), la), h2, zero)
        _write_pairs(v * (sc * SCALE), xd_ptr + r * xd_stride, xs_ptr + r * xs_stride + b_lo + i % nb, cols)
    gl.barrier()


@gluon.jit
def _finish(y_ptr, y_stride, out_ptr, out_stride, bias_ptr, cnt_ptr, pid_n, TICKETS, N_TOK, N_OUT,
            BM: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_L: tl.constexpr, NT: tl.constexpr, CLEAR: tl.constexpr,
            MANY: tl.constexpr):
    """Ticket of output block pid_n; the TICKETS-th program writes out[:N_TOK, block] = y (+ bias), cast (MANY:
    NT rows at a time; else N_TOK <= NT, one pass: this loop and a runtime row offset in the
    batch-1 kernel took it from 64 to 98 registers and 3.97 to 4.09 instructions per weight on sm_90).
    CLEAR: it also zeroes what it read and the ticket, leaving the buffer ready for the next launch."""
    if _last_to_arrive(cnt_ptr + pid_n, TICKETS):
        if MANY:
            for r0 in range(0, N_TOK, NT):
                _cast_rows(y_ptr, y_stride, out_ptr, out_stride, bias_ptr, pid_n, r0, N_TOK, N_OUT, BM, HAS_BIAS,
                           OUT_L, NT, CLEAR)
        else:
            _cast_rows(y_ptr, y_stride, out_ptr, out_stride, bias_ptr, pid_n, 0, N_TOK, N_OUT, BM, HAS_BIAS, OUT_L, NT,
                       CLEAR)
        if CLEAR:
            gl.store(cnt_ptr + pid_n, 0)


@gluon.jit
def _cast_rows(y_ptr, y_stride, out_ptr, out_stride, bias_ptr, pid_n, r0, N_TOK, N_OUT, BM: tl.constexpr,
               HAS_BIAS: tl.constexpr, OUT_L: tl.constexpr, NT: tl.constexpr, CLEAR: tl.constexpr):
    """out[r0 : r0 + NT, block pid_n] = y (+ bias) in out's dtype (CLEAR: y zeroed there after)."""
    c2 = pid_n * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, OUT_L))
    n2 = r0 + gl.arange(0, NT, layout=gl.SliceLayout(1, OUT_L))
    m2 = (n2 < N_TOK)[:, None] & (c2 < N_OUT)[None, :]
    yp = y_ptr + n2[:, None] * y_stride + c2[None, :]
    v = gl.load(yp, mask=m2, other=0, cache_modifier=".cg")
    if CLEAR:
        gl.store(yp, gl.zeros([NT, BM], gl.float32, OUT_L), mask=m2)
    if HAS_BIAS:
        v += gl.load(bias_ptr + c2, mask=c2 < N_OUT, other=0).to(gl.float32)[None, :]
    gl.store(out_ptr + n2[:, None] * out_stride + c2[None, :], v.to(out_ptr.dtype.element_ty), mask=m2)


@gluon.jit
def _gemv_tc_kernel(xd_ptr, x_stride, xs_ptr, xs_stride, ids_ptr, eid_ptr, w_ptr, tr_ptr, tr32_ptr, tr_estride,
                    sc_ptr, sc_estride, y_ptr, y_stride, out_ptr, out_stride, bias_ptr, s_ptr, hs_ptr, hs_stride,
                    cnt_ptr, xin_ptr, xin_stride, K_IN, M, N, N_OUT, KT, T_PER_SPLIT, TICKETS, TOP_K, N_PAIRS,
                    N_EXPERTS, GATE_OFF, NORM, HAD_SCALE,
                    BITS: tl.constexpr, L: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
                    FP16SUM: tl.constexpr, MT: tl.constexpr, W: tl.constexpr, OWN: tl.constexpr,
                    HB: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_L: tl.constexpr,
                    ROUTED: tl.constexpr, GATHER_A: tl.constexpr, SWIGLU: tl.constexpr, HAD: tl.constexpr,
                    HAD1: tl.constexpr, HAD_L: tl.constexpr, XL: tl.constexpr, NT: tl.constexpr, U: tl.constexpr,
                    CLEAR: tl.constexpr, SORTED: tl.constexpr):
    """x' @ W'^T for 16*MT*W outputs (grid axis 1) and one K slice (axis 2); the activations: fp16 pairs xd
    [rows, 2 * in_pad] with scales xs [rows, in_pad // HB]; tr / tr32: the trellis as int16 / int32.

    Dense (not ROUTED): rows NT * i .. NT * i + NT - 1 (axis 0 = i; NT, the MMA columns: 8, 16 or 32) of the
    M rows of x and out; ATOMIC (K split): partial sums into the zeroed fp32 y, the last program per output
    block (ticket in cnt_ptr, TICKETS programs: row blocks x K slices) writes out (+ bias), and with CLEAR
    zeroes its part of y and its ticket again. 32 columns (`_step_wide`): dense only, no SwiGLU. Dense with
    HAD (8 columns): the prologue writes the pairs of its own K slice from x at xin_ptr [M, K_IN] first
    (`_transform_slice`, signs s_ptr, blocks of HAD), so no launch precedes this one.
    ROUTED (MoE decode, axis 0 = flat slot s of expert ids[s], skipped unless 0 <= e < N_EXPERTS): all 8
    MMA columns read one x row; GATHER_A (launch 1, x row s // TOP_K, no K split): y[s] = silu(gate) * up
    (SWIGLU: rows n and GATE_OFF + n), and with HAD the last program of each HAD-block of the slot writes
    down's input H(s_ptr * y[s]) * HAD_SCALE as pairs into out / scales into hs (Hadamard as two small
    FMA matmuls, HAD = HAD1 x HAD // HAD1); else (launch 2, x row s): y[s // TOP_K] += w[s] * result by
    atomics, then `_finish` with TICKETS = slots x K slices.
    SORTED (MoE, more tokens): axis 0 = block b of NT pairs sorted by expert (`moe.align`: flat pair ids
    ids[NT b + j], N_PAIRS marking padding; expert eid[b], -1 for an unused block): MMA column j is pair j
    (its x row: pair // TOP_K in launch 1, the pair's own row in launch 2), everything else as above per
    valid column, so one decode of the expert serves up to NT pairs."""
    BM: tl.constexpr = 16 * MT * W
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])
    # NT token columns (8 or 16): the MMA's N
    la: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    lb: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    pid_n = gl.program_id(1)
    t_lo = gl.program_id(2) * T_PER_SPLIT
    if (not ROUTED) and (HAD > 0):  # first, while few values are live
        _transform_slice(xin_ptr, xin_stride, s_ptr, xd_ptr, x_stride, xs_ptr, xs_stride, M, K_IN, t_lo,
                         gl.minimum(t_lo + T_PER_SPLIT, KT), HAD_SCALE, HAD, HAD1, W)
    no = gl.arange(0, NT, layout=gl.SliceLayout(0, mma))
    if ROUTED:
        slot = gl.program_id(0)  # SORTED: the block of pairs
        if SORTED:
            e = gl.load(eid_ptr + slot).to(gl.int64)
        else:
            e = gl.load(ids_ptr + slot).to(gl.int64)
        if (e < 0) | (e >= N_EXPERTS):  # skipped slot, unused block
            if SORTED:  # no pairs: nothing to write, but launch 2's tickets count this program
                if ATOMIC:
                    _finish(y_ptr, y_stride, out_ptr, out_stride, bias_ptr, cnt_ptr, pid_n, TICKETS, M, N_OUT, BM,
                            HAS_BIAS, OUT_L, NT, False, True)
            elif HAD > 0:  # down's input for this slot's columns: zero pairs, scale 1
                c1 = pid_n * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, OUT_L))
                gl.store(out_ptr + slot * out_stride + 2 * c1, gl.zeros([BM], gl.float16, gl.SliceLayout(0, OUT_L)))
                gl.store(out_ptr + slot * out_stride + 2 * c1 + 1, gl.zeros([BM], gl.float16, gl.SliceLayout(0, OUT_L)))
                gl.store(hs_ptr + slot * hs_stride + pid_n * BM // HAD, 1.0)
            elif GATHER_A:
                c1 = pid_n * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, OUT_L))
                gl.store(y_ptr + slot * y_stride + c1, gl.zeros([BM], gl.float32, gl.SliceLayout(0, OUT_L)),
                         mask=c1 < N)
            elif ATOMIC:  # no contribution, but the block's ticket count includes this program
                _finish(y_ptr, y_stride, out_ptr, out_stride, bias_ptr, cnt_ptr, pid_n, TICKETS, M, N_OUT, BM,
                        HAS_BIAS, OUT_L, NT, False, False)
            return
        tr_ptr += e * tr_estride
        tr32_ptr += e * tr_estride // 2
        sc_ptr += e * sc_estride
        if SORTED:  # column j: pair j of the block (padding repeats the first pair, never stored)
            first = gl.load(ids_ptr + slot * NT)
            pb = gl.load(ids_ptr + slot * NT + gl.arange(0, NT, layout=gl.SliceLayout(1, gl.SliceLayout(2, XL))))
            ps = gl.load(ids_ptr + slot * NT + no)
            pb = gl.where(pb < N_PAIRS, pb, first)
            ps = gl.where(ps < N_PAIRS, ps, first)
            if GATHER_A:
                pb = pb // TOP_K
                ps = ps // TOP_K
            nb = pb
            xs_row = xs_ptr + ps * xs_stride
        else:
            if GATHER_A:
                x_row = slot // TOP_K
            else:
                x_row = slot
            nb = gl.zeros([NT], gl.int32, gl.SliceLayout(1, gl.SliceLayout(2, XL))) + x_row
            xs_row = xs_ptr + (gl.zeros([NT], gl.int32, gl.SliceLayout(0, mma)) + x_row) * xs_stride
    else:
        if NT > 16:  # this program's NT rows (33-64 rows: two blocks); rows past M repeat M - 1, not stored
            r0 = gl.program_id(0) * NT
        else:
            r0 = 0
        nb = gl.minimum(r0 + gl.arange(0, NT, layout=gl.SliceLayout(1, gl.SliceLayout(2, XL))), M - 1)
        xs_row = xs_ptr + gl.minimum(r0 + no, M - 1) * xs_stride
    # a thread's runs: J consecutive rows (MMA rows m, m + 8 (, + 16 W, + 16 W + 8): `_mma_rows`) x 2 tiles
    J: tl.constexpr = 2 * MT
    OWN4: gl.constexpr = _half_tiles(OWN)
    g = pid_n * BM + J * gl.arange(0, BM // J, layout=gl.SliceLayout(1, gl.SliceLayout(2, OWN4)))
    tiles = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, OWN4)))  # and tiles + 4: `_load_tiles`
    k = gl.arange(0, J * (BITS // 2), layout=gl.SliceLayout(0, gl.SliceLayout(1, OWN4)))
    hist_p, own_p = _pointers(tr_ptr, tr32_ptr, g, tiles, k, KT, N - 1, BITS)
    if SWIGLU:
        hist_u, own_u = _pointers(tr_ptr, tr32_ptr, GATE_OFF + g, tiles, k, KT, GATE_OFF + N - 1, BITS)
        acc_u = gl.zeros([BM, NT], gl.float32, layout=mma)
    # a K step's activations: [8 tokens, 4 lanes, 64] fp16, 128 contiguous bytes per lane (`pair_index`)
    # wide (32 columns): [NT, 4, 4] per weight c, loaded in `_step_wide`
    WIDE: tl.constexpr = NT > 16
    E3: tl.constexpr = 4 if WIDE else 64
    t3 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, XL)))
    e3 = gl.arange(0, E3, layout=gl.SliceLayout(0, gl.SliceLayout(1, XL)))
    xoff = nb[:, None, None] * x_stride + t3[None, :, None] * 64 + e3[None, None, :]
    acc = gl.zeros([BM, NT], gl.float32, layout=mma)
    sx_held = gl.full([NT], 1.0, gl.float32, gl.SliceLayout(0, mma))  # wide: acc is in units of this scale
    for t0 in range(t_lo, gl.minimum(t_lo + T_PER_SPLIT, KT), 8 * U):  # U K steps of 8 tiles, one scale
        if WIDE:  # rescale the sum to this block's scale (powers of two: exact), then MMA into it directly
            sx1 = gl.load(xs_row + (t0 >> _log2(HB // 16)))
            inv = (0x7F000000 - sx1.to(gl.int32, bitcast=True)).to(gl.float32, bitcast=True)  # 1 / sx1: 2**-e
            acc = acc * (sx_held * inv)[None, :]
            sx_held = sx1
            for u in gl.static_range(U):
                acc = _step_wide(_registers(hist_p, own_p, t0 + 8 * u, BITS, J, OWN), xd_ptr + (t0 + 8 * u) * 32 + xoff,
                                 acc, BITS, L, MUL, ADD, FP16SUM, J, W, la, lb)
        else:
            sx = gl.load(xs_row + (t0 >> _log2(HB // 16)))[None, :]  # the steps' activation scale
            part = gl.zeros([BM, NT], gl.float32, layout=mma)
            if SWIGLU:
                part_u = gl.zeros([BM, NT], gl.float32, layout=mma)
            for u in gl.static_range(U):
                xb = _operands(gl.load(xd_ptr + (t0 + 8 * u) * 32 + xoff), lb, NT)
                part = _step(_registers(hist_p, own_p, t0 + 8 * u, BITS, J, OWN), xb, part, BITS, L, MUL, ADD,
                             FP16SUM, J, W, la)
                if SWIGLU:
                    part_u = _step(_registers(hist_u, own_u, t0 + 8 * u, BITS, J, OWN), xb, part_u, BITS, L, MUL,
                                   ADD, FP16SUM, J, W, la)
            acc += part * sx
            if SWIGLU:
                acc_u += part_u * sx
    if WIDE:
        acc = acc * sx_held[None, :]
    rows_o = pid_n * BM + _mma_rows(gl.arange(0, BM, layout=gl.SliceLayout(1, mma)), J, W)
    y = acc * (gl.load(sc_ptr + gl.minimum(rows_o, N - 1)).to(gl.float32) * NORM)[:, None]
    if SWIGLU:
        up = acc_u * (gl.load(sc_ptr + GATE_OFF + gl.minimum(rows_o, N - 1)).to(gl.float32) * NORM)[:, None]
        y = y / (1 + gl.exp(-y)) * up
    if ROUTED and SORTED:
        pc = gl.load(ids_ptr + slot * NT + no)
        ok = (rows_o < N)[:, None] & (pc < N_PAIRS)[None, :]
        if GATHER_A:
            gl.store(y_ptr + pc[None, :] * y_stride + rows_o[:, None], y, mask=ok)
            if HAD > 0:  # the last program of this block's HAD-block transforms it for each pair
                g = pid_n * BM // HAD
                if _last_to_arrive(cnt_ptr + slot * (gl.num_programs(1) * BM // HAD) + g, HAD // BM):
                    for j in range(NT):
                        p = gl.load(ids_ptr + slot * NT + j)
                        if p < N_PAIRS:
                            _had_row(y_ptr + p * y_stride, s_ptr, out_ptr + p * out_stride, hs_ptr + p * hs_stride,
                                     g, N, HAD_SCALE, HAD, HAD1, HAD_L)
        else:
            y = y * gl.load(w_ptr + pc, mask=pc < N_PAIRS, other=0).to(gl.float32)[None, :]
            gl.atomic_add(y_ptr + (pc // TOP_K)[None, :] * y_stride + rows_o[:, None], y, mask=ok, sem="relaxed")
            _finish(y_ptr, y_stride, out_ptr, out_stride, bias_ptr, cnt_ptr, pid_n, TICKETS, M, N_OUT, BM, HAS_BIAS,
                    OUT_L, NT, False, True)
    elif ROUTED:
        one = (rows_o < N)[:, None] & (no == 0)[None, :]  # column 0: the slot's token
        if GATHER_A:
            gl.store(y_ptr + slot * y_stride + rows_o[:, None] + no[None, :] * 0, y, mask=one)
            if HAD > 0:  # the last program of this slot's HAD-block transforms it (ordering: `_last_to_arrive`)
                g = pid_n * BM // HAD
                if _last_to_arrive(cnt_ptr + slot * (gl.num_programs(1) * BM // HAD) + g, HAD // BM):
                    _had_row(y_ptr + slot * y_stride, s_ptr, out_ptr + slot * out_stride, hs_ptr + slot * hs_stride,
                             g, N, HAD_SCALE, HAD, HAD1, HAD_L)
        else:
            y = y * gl.load(w_ptr + slot).to(gl.float32)
            gl.atomic_add(y_ptr + (slot // TOP_K) * y_stride + rows_o[:, None] + no[None, :] * 0, y, mask=one,
                          sem="relaxed")
            _finish(y_ptr, y_stride, out_ptr, out_stride, bias_ptr, cnt_ptr, pid_n, TICKETS, M, N_OUT, BM, HAS_BIAS,
                    OUT_L, NT, False, False)
    elif ATOMIC:
        gl.atomic_add(y_ptr + (r0 + no)[None, :] * y_stride + rows_o[:, None], y,
                      mask=(rows_o < N_OUT)[:, None] & (r0 + no < M)[None, :], sem="relaxed")
        _finish(y_ptr, y_stride, out_ptr, out_stride, bias_ptr, cnt_ptr, pid_n, TICKETS, M, N_OUT, BM, HAS_BIAS,
                OUT_L, NT, CLEAR, NT > 16)
    else:
        if HAS_BIAS:
            y += gl.load(bias_ptr + rows_o, mask=rows_o < N_OUT, other=0).to(gl.float32)[:, None]
        gl.store(out_ptr + (r0 + no)[None, :] * out_stride + rows_o[:, None], y.to(out_ptr.dtype.element_ty),
                 mask=(rows_o < N_OUT)[:, None] & (r0 + no < M)[None, :])


def own_layout(mt: int, warps: int, bits: int):
    """The groups' own words [8 * warps groups, 8 tiles, J * (2 at 4 bits, else 1)]: a thread's J = 2 mt
    consecutive rows in registers, contiguous; its tiles t, t + 4 (lanes: tiles + 1, + 2, groups + 1, + 2,
    + 4; warps: groups + 8 ..), as A's layout holds the rows (`_a_operand`)."""
    ko = 2 * mt * (bits // 2)
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1 << i] for i in range(int(math.log2(ko)))] + [[0, 4, 0]],
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[8 << i, 0, 0] for i in range(int(math.log2(warps)))], block_bases=[], shape=[8 * warps, 8, ko])


def out_layout(warps: int):
    return gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32], warps_per_cta=[1, warps], order=[1, 0])


def xd_layout(warps: int, nt: int = 8):
    """A K step's activations [nt tokens, 4 lanes, 64] (8 or 16 columns: `_operands`), or one weight's
    [nt, 4, 4] (32 columns: `_b_wide`): lanes hold tokens + 1, + 2, + 4 and tiles % 4 as B's layout,
    every warp all of it."""
    e = 6 if nt <= 16 else 2
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1 << i] for i in range(e)] + [[8 << i, 0, 0] for i in range(int(math.log2(nt // 8)))],
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[0, 0, 0]] * int(math.log2(warps)), block_bases=[], shape=[nt, 4, 1 << e])


def had_layout(warps: int):
    return gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[4, 8], warps_per_cta=[warps, 1], order=[1, 0])


# --- the interpreter twin: the same source as a Triton kernel, layouts erased ---------------------------------


@triton.jit
def _pairs_twin(x, FP16SUM: tl.constexpr):
    """What `_pairs`' asm computes: element 2j takes the low half of the pair, 2j+1 the high half."""
    if FP16SUM:
        y = (x & 0x8FFF8FFF) ^ 0x3B603B60
    else:
        y = (x & 0x00FF00FF) + ((x >> 8) & 0x00FF00FF)
        y = ((y + (y >> 16)) & 0xFFFF) + 0xE5FE6400
    lo = (tl.arange(0, 16) % 2 == 0)[None, :]
    return tl.where(lo, y & 0xFFFF, y >> 16).to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _last_to_arrive_twin(counter_ptr, n):
    return tl.atomic_add(counter_ptr, 1) == n - 1


class _Erased:
    """`gl` for the twin: Triton's ops (looked up per call: the interpreter patches them while it runs),
    layouts dropped."""

    def __getattr__(self, name):
        return getattr(tl, name)

    @staticmethod
    def arange(start, end, layout=None):
        return tl.arange(start, end)

    @staticmethod
    def zeros(shape, dtype, layout=None):
        return tl.zeros(shape, dtype)

    @staticmethod
    def full(shape, value, dtype, layout=None):
        return tl.full(shape, value, dtype)

    @staticmethod
    def convert_layout(x, layout, assert_trivial=False):
        return x

    @staticmethod
    def atomic_add(ptr, val, mask=None, sem=None, scope=None):
        return tl.atomic_add(ptr, val, mask=mask)

    @staticmethod
    def barrier():
        return tl.debug_barrier()

    @staticmethod
    def dot_fma(a, b, acc):
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)

    @staticmethod
    def NVMMADistributedLayout(*args, **kwargs):
        return None

    DotOperandLayout = SliceLayout = BlockedLayout = NVMMADistributedLayout


_GLUON_HELPERS = ("_pointers", "_load_tiles", "_by_row", "_rot", "_registers", "_funnel", "_window", "_hash", "_a_of",
                  "_step", "_step_wide", "_b_wide", "_a_operand", "_mma_rows", "_operands", "_lb", "_hadamard",
                  "_write_pairs", "_had_row", "_transform_slice", "_finish", "_cast_rows")


def _interpreted():
    """`_gemv_tc_kernel` and its helpers as Triton functions for the interpreter (module docstring)."""
    env = dict(globals(), gl=_Erased(), _pairs=_pairs_twin, _last_to_arrive=_last_to_arrive_twin,
               mma_v2=lambda a, b, acc: tl.dot(a.to(tl.float32), b.to(tl.float32), acc))

    def twin(jit_fn):
        fn = jit_fn.fn
        return triton.jit(types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__))

    for name in _GLUON_HELPERS:
        env[name] = twin(globals()[name])
    return twin(_gemv_tc_kernel)


_KERNEL = _interpreted() if INTERPRET else _gemv_tc_kernel
def _tensor_cores(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return INTERPRET or device.type == "meta"


def supported(x: torch.Tensor, qt) -> bool:
    """The tensor-core GEMV runs this product: at most 64 rows, tensor cores (sm_80+, or the interpreter), and
    Hadamard blocks of at least one K step (so every step has one activation scale)."""
    return (x.shape[0] <= MAX_ROWS and qt.signs_out is None and qt.had_in >= MIN_BLOCK
            and _tensor_cores(x.device))


def moe_supported(hidden: torch.Tensor, gate_up, down, act) -> bool:
    """The fused tensor-core decode step runs this MoE layer: a few tokens, SwiGLU, no output rotations,
    both Hadamard blocks of at least one K step, launch 1's output blocks inside down's Hadamard blocks, and
    an even intermediate size (launch 1's threads own pairs of consecutive rows, also at the up rows)."""
    inter, inter_pad = down.shape[-1], down.signs_in.shape[0]
    return (hidden.shape[0] <= MOE_MAX_TOKENS and act is torch.nn.functional.silu and gate_up.signs_out is None
            and down.signs_out is None and min(gate_up.had_in, down.had_in) >= MIN_BLOCK
            and down.had_in % MOE_BM1 == 0 and triton.cdiv(inter, MOE_BM1) * MOE_BM1 == inter_pad and inter % 2 == 0
            and _tensor_cores(hidden.device))


def steps_per_iteration(qt, nt: int = 8) -> int:
    """K steps of 8 tiles per loop iteration: 2 where Hadamard blocks (one activation scale) hold both, which
    shares the scale's load and FFMAs and the loop's own instructions between them; 1 with 16 MMA columns
    (twice the activation registers: two steps spill in the loop); with 32 (B operands loaded per weight, the
    sum rescaled per block) as many as a block holds, up to 4 (2 bits, measured with a division in the
    rescale: 5.41 instructions per weight against 5.68 with 2 and 6.21 with 1)."""
    KT = qt.trellis.shape[-2]
    if nt > 16:
        u = min(4, qt.had_in // 128)
        while KT % (8 * u):
            u //= 2
        return u
    return 2 if nt == 8 and qt.had_in >= 256 and KT % 16 == 0 else 1


def split_for(device: torch.device, programs: int, KT: int, U: int = 1) -> tuple[int, int]:
    """(K slices, tiles per slice): whole loop iterations (U steps of 8 tiles), for about 4 programs per SM."""
    unit = 8 * U
    split = max(1, min(KT // unit, sm_count(device) * 4 // max(1, programs)))
    t_per = triton.cdiv(KT // unit, split) * unit
    return triton.cdiv(KT, t_per), t_per


def _max_registers(nt: int, prologue: bool, sorted_pairs: bool, swiglu: bool) -> int | None:
    """ptxas's register limit where its own choice spilled (`tests/test_sass.py`, bench/sass.py): 32 columns
    and the sorted MoE's gate_up with 16 (232); the one-launch GEMV and the sorted down with 8 columns (128)."""
    if nt > 16 or (sorted_pairs and nt == 16):
        return WIDE_MAXNREG
    if prologue or (sorted_pairs and not swiglu):
        return FUSED_MAXNREG
    return None


def _launch(grid, xd, xs, qt, tr, scales, *, y, out, counters, n_rows, n_out, t_per, tickets, mt, warps,
            bias=None, ids=None, weights=None, top_k=1, gate_off=0, had=None, nt=8, x_in=None, eids=None,
            n_pairs=0):
    """One `_gemv_tc_kernel` launch (see there); had = (signs, block, scales out) for launch 1's epilogue;
    x_in: the dense rows to transform in the prologue into xd / xs (the split-K sum then clears itself);
    eids: the experts of blocks of nt sorted pairs in ids (SORTED; n_pairs marks padding)."""
    KT = tr.shape[-2]
    routed = ids is not None
    estride = tr[0].numel() if routed else 0
    dummy = out
    if x_in is not None:
        had = (qt.signs_in, qt.had_in, dummy)
    hb = had[1] if had is not None else 0
    nreg = _max_registers(nt, x_in is not None, eids is not None, gate_off > 0)
    launch(_KERNEL, grid, xd, xd.stride(0), xs, xs.stride(0), ids if routed else dummy,
           eids if eids is not None else dummy, weights if weights is not None else dummy, tr,
           tr.view(torch.int32) if qt.bits in (2, 4) else tr, estride,
           scales, scales[0].numel() if routed else 0, y, y.stride(0), out, out.stride(0),
           bias if bias is not None else dummy, had[0] if had is not None else dummy,
           had[2] if had is not None else dummy, had[2].stride(0) if had is not None else 0,
           counters if counters is not None else dummy, x_in if x_in is not None else dummy,
           x_in.stride(0) if x_in is not None else 0, x_in.shape[1] if x_in is not None else 0,
           n_rows, tr.shape[-3] * 16 if gate_off == 0 else gate_off,
           n_out, KT, t_per, tickets, top_k, n_pairs, tr.shape[0] if routed else 1, gate_off, code_norm(qt),
           hb ** -0.5 if hb else 1.0, MT=mt, W=warps, OWN=own_layout(mt, warps, qt.bits), HB=qt.had_in,
           ATOMIC=counters is not None and (had is None or x_in is not None), HAS_BIAS=bias is not None,
           OUT_L=out_layout(warps),
           ROUTED=routed, GATHER_A=routed and gate_off > 0, SWIGLU=gate_off > 0, HAD=hb,
           HAD1=1 << (hb.bit_length() - 1) // 2 if hb else 1, HAD_L=had_layout(warps), XL=xd_layout(warps, nt), NT=nt,
           U=steps_per_iteration(qt, nt), CLEAR=x_in is not None, SORTED=eids is not None, num_warps=warps,
           **({"maxnreg": nreg} if nreg else {}),
           **code_params(qt))


_SUMS = WeakTensorKeyDictionary()  # trellis -> the one-launch GEMV's split-K sum and tickets, zero between calls


def _split_sum(qt, n: int, programs: int) -> torch.Tensor:
    """[8 rows x n fp32 sums | programs int32 tickets] for qt, zeroed once: every launch's finishing programs
    zero what they used again, so no launch has to clear it. One call at a time per weight (one stream)."""
    buf = _SUMS.get(qt.trellis)
    if buf is None:
        buf = _SUMS[qt.trellis] = torch.zeros(8 * n + programs, dtype=torch.float32, device=qt.trellis.device)
    return buf


def prologue_elements(rows: int, programs: int, KT: int, t_per: int, block: int) -> int:
    """Activation values the one-launch GEMV's prologues transform in all: every program, for every row, each
    Hadamard block its K slice of t_per tiles touches (the programs of a slice repeat each other's work)."""
    tb = block // 16
    touched = sum(-(-min(t + t_per, KT) // tb) - t // tb for t in range(0, KT, t_per))
    return rows * programs * touched * block


def _plan(M: int, qt, device: torch.device) -> tuple[int, int, int, int, int, bool]:
    """(output blocks, MMA columns, row blocks, K slices, tiles per slice, one launch) of `qlinear_tc`."""
    programs = triton.cdiv(qt.trellis.shape[0] * 16, 16 * MT * WARPS)
    nt = min(32, max(8, triton.next_power_of_2(M)))
    blocks = triton.cdiv(M, nt)
    KT = qt.trellis.shape[1]
    split, t_per = split_for(device, programs * blocks, KT, steps_per_iteration(qt, nt))
    fused = (nt == 8 and qt.had_in >= FUSED_MIN_BLOCK
             and prologue_elements(M, programs, KT, t_per, qt.had_in) <= FUSED_MAX_ELEMENTS)
    return programs, nt, blocks, split, t_per, fused


def one_launch(x2: torch.Tensor, qt) -> bool:
    """Whether `qlinear_tc` runs x2 @ W^T in one launch (the input transform in the GEMV's prologue)."""
    return _plan(x2.shape[0], qt, x2.device)[-1]


def qlinear_tc(x2: torch.Tensor, qt, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x2 @ W^T (+ bias) for at most 64 rows (8, 16 or 32 MMA columns; 33-64 rows: two blocks of 32 rows,
    each decoding the weight), output side not rotated. Up to 8 rows with Hadamard blocks >= 256 one launch
    where the prologues' repeated work stays below about a launch's time (`prologue_elements`): each program
    transforms its own K slice of x (`_transform_slice`) and the K-split sum is a buffer kept zero by its
    finishing programs (`_split_sum`). Otherwise two: the input transform as scaled fp16 pairs,
    which also zeroes the partial sums and tickets, then the GEMV (a prologue per program would transform
    16-64 rows)."""
    from .hadamard import transform_pairs

    M, out_f = x2.shape[0], qt.shape[-2]
    N = qt.trellis.shape[0] * 16
    programs, nt, blocks, split, t_per, fused = _plan(M, qt, x2.device)
    out = torch.empty(M, out_f, dtype=x2.dtype, device=x2.device)
    if fused:
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_pad = qt.signs_in.shape[0]
        xd = torch.empty(M, 2 * n_pad, dtype=torch.float16, device=x2.device)
        xs = torch.empty(M, n_pad // qt.had_in, dtype=torch.float32, device=x2.device)
        y = counters = None
        if split > 1:
            buf = _split_sum(qt, N, programs)
            y, counters = buf[:M * N].view(M, N), buf[8 * N:].view(torch.int32)
        _launch((1, programs, split), xd, xs, qt, qt.trellis, qt.scales, y=out if y is None else y, out=out,
                counters=counters, n_rows=M, n_out=out_f, t_per=t_per, tickets=split, mt=MT, warps=WARPS,
                bias=bias, x_in=x2)
        return out
    scratch = y = counters = None
    if split > 1:  # [y | one ticket counter per output block], zeroed by the transform
        scratch = torch.empty(M * N + programs, dtype=torch.float32, device=x2.device)
        y, counters = scratch[:M * N].view(M, N), scratch[M * N:].view(torch.int32)
    xd, xs = transform_pairs(x2, qt.signs_in, qt.had_in, zero=scratch)
    _launch((blocks, programs, split), xd, xs, qt, qt.trellis, qt.scales, y=out if y is None else y, out=out,
            counters=counters, n_rows=M, n_out=out_f, t_per=t_per, tickets=blocks * split, mt=MT, warps=WARPS,
            bias=bias, nt=nt)
    return out


def sorted_block(top_k_index: torch.Tensor, experts: int) -> int:
    """Pairs per sorted block (MMA columns): 8 while the experts average at most 8 pairs (one block each at 4.1
    instructions per weight), else 16 (4.7-5.5 per weight per 16 pairs, against two blocks of 8 at 8.2 and the
    GEMM's 16-row block at 8.2)."""
    return 8 if top_k_index.numel() <= 8 * experts else 16


def moe_sorted_supported(hidden: torch.Tensor, top_k_index: torch.Tensor, gate_up, down, act) -> bool:
    """`qmoe_tc` with sorted pairs runs this MoE layer: as `moe_supported` but more than 8 tokens, with at most
    SORTED_MAX_PAIRS (token, slot) pairs per expert on average (more: the GEMM, whose loads suit long prompts;
    the two were not compared on a GPU there)."""
    T, K = top_k_index.shape
    return (MOE_MAX_TOKENS < T and T * K <= SORTED_MAX_PAIRS * gate_up.shape[0]
            and moe_supported(hidden[:1], gate_up, down, act))


def qmoe_tc(hidden, top_k_index, top_k_weights, gate_up, down, pairs=None) -> torch.Tensor:
    """A MoE layer in three launches, as `moe._qmoe_gemv` but on tensor cores: the input transform as scaled
    fp16 pairs (zeroing the output sum and all tickets); gate_up with SwiGLU, one program per (row, 32
    outputs), whose last program per (row, Hadamard block) writes down's input as scaled pairs; down, K split,
    routing weight and sum over slots by atomics, the last program per output block casting. No host sync, no
    state kept between calls (CUDA-graph capturable).

    Rows: one per (token, slot) for the decode step (`moe_supported`, at most 8 tokens); with pairs = (ids,
    eids) from `moe.align(..., SORTED_BM)` (`moe_sorted_supported`) one per block of 8 pairs sorted by expert,
    each pair an MMA column (the 8 columns the decode step leaves unused), so an expert with at most 8 pairs
    is decoded once at the GEMV's cost per weight instead of once per 16-row GEMM block at about twice it."""
    from .hadamard import transform_pairs

    T, K = top_k_index.shape
    dev = hidden.device
    ids, eids = pairs if pairs is not None else (top_k_index.reshape(-1), None)
    rows = eids.shape[0] if pairs is not None else T * K
    n_pairs = T * K if pairs is not None else 0  # marks the padding of sorted blocks
    nt = ids.numel() // rows if pairs is not None else 8  # MMA columns: pairs per sorted block
    inter_pad, h_pad = down.signs_in.shape[0], down.trellis.shape[-3] * 16
    n1 = inter_pad // MOE_BM1
    n2 = triton.cdiv(h_pad, 16 * MT * WARPS)
    split, t_per = split_for(dev, rows * n2, down.trellis.shape[-2], steps_per_iteration(down, nt))
    groups = rows * (inter_pad // down.had_in)
    # one zeroed buffer: [y (fp32 sum over slots) | down's tickets per output block | launch 1's tickets]
    scratch = torch.empty(T * h_pad + n2 + groups, dtype=torch.float32, device=dev)
    y = scratch[:T * h_pad].view(T, h_pad)
    xd, xs = transform_pairs(hidden, gate_up.signs_in, gate_up.had_in, zero=scratch)
    h = torch.empty(T * K, inter_pad, dtype=torch.float32, device=dev)
    hd = torch.empty(T * K, 2 * inter_pad, dtype=torch.float16, device=dev)
    hs = torch.empty(T * K, inter_pad // down.had_in, dtype=torch.float32, device=dev)
    _launch((rows, n1, 1), xd, xs, gate_up, gate_up.trellis, gate_up.scales, y=h, out=hd,
            counters=scratch[T * h_pad + n2:].view(torch.int32), n_rows=1, n_out=inter_pad,
            t_per=gate_up.trellis.shape[-2], tickets=1, mt=1, warps=MOE_BM1 // 16, ids=ids, top_k=K,
            gate_off=down.shape[-1], had=(down.signs_in, down.had_in, hs), eids=eids, n_pairs=n_pairs, nt=nt)
    out = torch.empty(T, down.shape[-2], dtype=hidden.dtype, device=dev)
    _launch((rows, n2, split), hd, hs, down, down.trellis, down.scales, y=y, out=out,
            counters=scratch[T * h_pad:T * h_pad + n2].view(torch.int32), n_rows=T, n_out=down.shape[-2],
            t_per=t_per, tickets=rows * split, mt=MT, warps=WARPS, ids=ids, weights=top_k_weights.reshape(-1),
            top_k=K, eids=eids, n_pairs=n_pairs, nt=nt)
    return out
