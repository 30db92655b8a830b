"""Tensor-core GEMV for a few rows (batch-1 decode): each decoded weight goes straight into an MMA operand.

The CUDA-core GEMV (`gemm._gemv_kernel`) spends about 7 SASS instructions per weight: window
(2), hash (1 IMAD), code (1 dp4a or lop3), then a conversion to fp32 and an FFMA. Here the code's
output register *is* the operand: `dp4a(x, 0x01010101, 0xE5FE6400)` yields the exact fp16 pair
(1024 + s, -1534) and the fp16-sum codes' `lop3` the exact pair (lo, hi); both sum to the code value
(s - 510, lo + hi). Taken as two K entries of an m16n8k16 MMA whose other operand holds the
activation twice, they give x * value with fp32 accumulation and no conversion, so a weight costs
window + hash + code = 4 instructions plus a quarter MMA (docs/KERNELS.md).

Layout (Gluon, so the operand layout is exact and nothing moves between threads): weights are
MMA operand A (16 output rows x 8 weights per MMA); MMA number c of a K step takes weight c of the
runs of 8 tiles (A's K slot p <-> tile p), so a thread cuts all 16 windows of its 4*MT runs from
64-bit strings with compile-time shifts, as the CUDA-core kernels do. Operand B is the activation,
8 token columns (rows past M repeat the last one and are never stored), read as fp16 pairs written
by the input transform (`hadamard.transform(..., pairs=True)`) with one power-of-two scale per
(token, Hadamard block) to keep fp16 in range; a block's partial sum is scaled into the fp32 total.

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
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .decode import code_norm, code_params
from .launch import launch, sm_count

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
MAX_ROWS = 8  # the MMA's N
MIN_BLOCK = 128  # a K step (8 tiles) must lie inside one Hadamard block of the activation scales
MT, WARPS = 2, 4  # 16-row blocks per warp, warps per program: 128 outputs per program


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
def _gemv_tc_kernel(xd_ptr, x_stride, xs_ptr, xs_stride, tr_ptr, tr32_ptr, sc_ptr, y_ptr, y_stride,
                    out_ptr, out_stride, bias_ptr, cnt_ptr, M, N, N_OUT, KT, T_PER_SPLIT, TICKETS, NORM,
                    BITS: tl.constexpr, L: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
                    FP16SUM: tl.constexpr, MT: tl.constexpr, W: tl.constexpr, RUNS: tl.constexpr,
                    HB: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_L: tl.constexpr):
    """out[:M, block] = x' @ W'^T (+ bias) for 16*MT*W outputs of W' and one K slice (grid axis 1).

    xd: the activation as fp16 pairs [M, 2 * in_pad] with scale xs[m, block of HB columns]; tr / tr32:
    the trellis words as int16 / int32. ATOMIC (K split): partial sums go to the zeroed fp32 y and
    the last program per output block (ticket in cnt_ptr, TICKETS = K slices) writes out."""
    BM: gl.constexpr = 16 * MT * W
    NW: gl.constexpr = 16 * BITS
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])
    la: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    lb: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    pid_n = gl.program_id(0)
    t_lo = gl.program_id(1) * T_PER_SPLIT
    # runs [BM rows, 8 tiles] in A's layout without its pair bit; rows past N are clamped (never stored)
    rows = gl.minimum(pid_n * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, RUNS)), N - 1)
    tiles = gl.arange(0, 8, layout=gl.SliceLayout(0, RUNS))
    r = (rows % 16)[:, None]
    run0 = ((rows // 16)[:, None] * KT + tiles[None, :]) * NW
    hist_off = run0 + (r * BITS - 1 + NW) % NW  # the word before the run's own, circularly
    new_off = run0 + r * BITS
    k2 = gl.arange(0, 16, layout=gl.SliceLayout(1, lb))
    nb = gl.minimum(gl.arange(0, 8, layout=gl.SliceLayout(0, lb)), M - 1)
    xoff = gl.max_contiguous(gl.multiple_of(nb[None, :] * x_stride + (k2 // 2 * 32 + k2 % 2)[:, None], [2, 1]),
                             [2, 1])
    no = gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
    xs_row = xs_ptr + gl.minimum(no, M - 1) * xs_stride
    acc = gl.zeros([BM, 8], gl.float32, layout=mma)
    for t0 in range(t_lo, gl.minimum(t_lo + T_PER_SPLIT, KT), 8):  # K steps of 8 tiles
        part = gl.zeros([BM, 8], gl.float32, layout=mma)
        tr = tr_ptr + t0 * NW
        hist = gl.load(tr + hist_off).to(gl.uint16).to(gl.uint32)
        if BITS == 2:  # words (2r, 2r+1) are one aligned int32: string hist|w0|w1 in (hi, lo)
            u = gl.load(tr32_ptr + (t0 * NW + new_off) // 2).to(gl.uint32)
            a = (((hist << 16) | (u & 0xFFFF)).to(gl.uint64) << 32) | u.to(gl.uint64)
            b = a
        elif BITS == 4:  # words 4r..4r+3 are two aligned int32s
            u0 = gl.load(tr32_ptr + (t0 * NW + new_off) // 2).to(gl.uint32)
            u1 = gl.load(tr32_ptr + (t0 * NW + new_off) // 2 + 1).to(gl.uint32)
            a = (((hist << 16) | (u0 & 0xFFFF)).to(gl.uint64) << 32) | \
                ((u0 & 0xFFFF0000) | (u1 & 0xFFFF)).to(gl.uint64)
            b = (((u0 << 16) | (u0 >> 16)).to(gl.uint64) << 32) | ((u1 << 16) | (u1 >> 16)).to(gl.uint64)
        else:
            a = hist.to(gl.uint64) << 48
            for q in gl.static_range(3):
                a = a | (gl.load(tr + new_off + q).to(gl.uint16).to(gl.uint64) << (32 - 16 * q))
            b = a
        xp = xd_ptr + t0 * 32 + xoff
        for c in gl.static_range(16):
            # window c of each run: string bits [E - L, E), E = 16 + BITS * (c + 1) (a: 64 bits, b: 80)
            if 16 + BITS * (c + 1) <= 64:
                st = a >> (48 - BITS * (c + 1))
            else:
                st = b >> (64 - BITS * (c + 1))
            st = (st & ((1 << L) - 1)).to(gl.uint32) * MUL + ADD
            wa = gl.convert_layout(gl.reshape(gl.join(st, st), [BM, 16]), la, assert_trivial=True)
            part = mma_v2(_pairs(wa, FP16SUM), gl.load(xp + 2 * c), part)
        acc += part * gl.load(xs_row + t0 // (HB // 16))[None, :]  # the step's activation scale
    rows_o = pid_n * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    y = acc * (gl.load(sc_ptr + gl.minimum(rows_o, N - 1)).to(gl.float32) * NORM)[:, None]
    if ATOMIC:
        gl.atomic_add(y_ptr + no[None, :] * y_stride + rows_o[:, None], y,
                      mask=(rows_o < N)[:, None] & (no < M)[None, :], sem="relaxed")
        if _last_to_arrive(cnt_ptr + pid_n, TICKETS):
            n2 = gl.arange(0, 8, layout=gl.SliceLayout(1, OUT_L))
            c2 = pid_n * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, OUT_L))
            m2 = (n2 < M)[:, None] & (c2 < N_OUT)[None, :]
            v = gl.load(y_ptr + n2[:, None] * y_stride + c2[None, :], mask=m2, other=0, cache_modifier=".cg")
            if HAS_BIAS:
                v += gl.load(bias_ptr + c2, mask=c2 < N_OUT, other=0).to(gl.float32)[None, :]
            gl.store(out_ptr + n2[:, None] * out_stride + c2[None, :], v.to(out_ptr.dtype.element_ty), mask=m2)
    else:
        if HAS_BIAS:
            y += gl.load(bias_ptr + rows_o, mask=rows_o < N_OUT, other=0).to(gl.float32)[:, None]
        gl.store(out_ptr + no[None, :] * out_stride + rows_o[:, None], y.to(out_ptr.dtype.element_ty),
                 mask=(rows_o < N_OUT)[:, None] & (no < M)[None, :])


def runs_layout(mt: int, warps: int):
    """A's DotOperand layout ([16*mt*warps, 16]: registers k+1, m+8, k+8, then the mt blocks; lanes k+2,
    k+4, m+1, m+2, m+4; warps m+16..) with the pair bit (k+1) dropped: [rows, 8 tiles]."""
    return gl.DistributedLinearLayout(
        reg_bases=[[8, 0], [0, 4]] + [[(16 * warps) << i, 0] for i in range(int(math.log2(mt)))],
        lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(int(math.log2(warps)))], block_bases=[], shape=[16 * mt * warps, 8])


def out_layout(warps: int):
    return gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32], warps_per_cta=[1, warps], order=[1, 0])


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
    def convert_layout(x, layout, assert_trivial=False):
        return x

    @staticmethod
    def atomic_add(ptr, val, mask=None, sem=None, scope=None):
        return tl.atomic_add(ptr, val, mask=mask)

    @staticmethod
    def NVMMADistributedLayout(*args, **kwargs):
        return None

    DotOperandLayout = SliceLayout = NVMMADistributedLayout


def _interpreted():
    """`_gemv_tc_kernel`'s source as a Triton kernel for the interpreter (see the module docstring)."""
    fn = _gemv_tc_kernel.fn
    env = dict(fn.__globals__, gl=_Erased(), tl=tl, _pairs=_pairs_twin, _last_to_arrive=_last_to_arrive_twin,
               mma_v2=lambda a, b, acc: tl.dot(a.to(tl.float32), b.to(tl.float32), acc))
    twin = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__)
    return triton.jit(twin)


_KERNEL = _interpreted() if INTERPRET else _gemv_tc_kernel


def supported(x: torch.Tensor, qt) -> bool:
    """The tensor-core GEMV runs this product: a few rows, tensor cores (sm_80+, or the interpreter), and
    Hadamard blocks of at least one K step (so every step has one activation scale)."""
    if x.shape[0] > MAX_ROWS or qt.signs_out is not None or qt.had_in < MIN_BLOCK:
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 0)
    return INTERPRET or x.device.type == "meta"


def split_for(device: torch.device, programs: int, KT: int) -> int:
    """K slices (whole K steps of 8 tiles each) for about 4 programs per SM."""
    return max(1, min(KT // 8, sm_count(device) * 4 // max(1, programs)))


def qlinear_tc(x2: torch.Tensor, qt, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x2 @ W^T (+ bias) for at most 8 rows, output side not rotated: two launches (the input transform
    as scaled fp16 pairs, which also zeroes the partial sums and tickets; the tensor-core GEMV)."""
    from .hadamard import transform_pairs

    M, out_f = x2.shape[0], qt.shape[-2]
    N, KT = qt.trellis.shape[0] * 16, qt.trellis.shape[1]
    bm = 16 * MT * WARPS
    programs = triton.cdiv(N, bm)
    split = split_for(x2.device, programs, KT)
    t_per = triton.cdiv(KT // 8, split) * 8
    split = triton.cdiv(KT, t_per)
    out = torch.empty(M, out_f, dtype=x2.dtype, device=x2.device)
    scratch = y = counters = None
    if split > 1:  # [y | one ticket counter per output block], zeroed by the transform
        scratch = torch.empty(M * N + programs, dtype=torch.float32, device=x2.device)
        y, counters = scratch[:M * N].view(M, N), scratch[M * N:].view(torch.int32)
    xd, xs = transform_pairs(x2, qt.signs_in, qt.had_in, zero=scratch)
    tr = qt.trellis
    launch(_KERNEL, (programs, split), xd, xd.stride(0), xs, xs.stride(0), tr,
           tr.view(torch.int32) if qt.bits in (2, 4) else tr, qt.scales, y if y is not None else out,
           y.stride(0) if y is not None else 0, out, out.stride(0), bias if bias is not None else out,
           counters if counters is not None else out, M, N, out_f, KT, t_per, split, code_norm(qt),
           MT=MT, W=WARPS, RUNS=runs_layout(MT, WARPS), HB=qt.had_in, ATOMIC=split > 1, HAS_BIAS=bias is not None,
           OUT_L=out_layout(WARPS), num_warps=WARPS, **code_params(qt))
    return out
