"""Fused routed-expert MoE on packed trellis weights (Triton).

Up to 8 tokens (the decode step): routed GEMVs, one program row per (token, slot), no sorting, three
launches: on tensor cores (`gemv_tc.qmoe_tc`) where the layer allows (SwiGLU, Hadamard blocks >= 128, no
output rotations, sm_80+), else on CUDA cores (`_qmoe_gemv`, up to 4 tokens).

More tokens, flow for T tokens, top-K routing, E experts (four launches, no torch kernel):
1. `align` (one program): the T*K (token, slot) pairs are sorted by expert and each expert's run is
   padded to the block size BM, so every block of BM rows belongs to one expert (no host sync).
2. The gate_up input transform H(s * x) is shared by all experts of the stack: done once per token;
   the same launch zeroes the fp32 output sum and both launches' tickets.
3. Launch 1: per block, gather the tokens' rotated rows, decode the expert's gate and up rows
   inside the K loop, apply SwiGLU, write the intermediate in sorted order; the last program per
   (block, Hadamard block) writes down's input transform of it.
4. Launch 2: per block, decode the expert's down weight and add routing weight * row to its
   token's row by fp32 atomics (the weighted sum over slots); the last program per output block
   casts the block into the output.
If gate_up rotates its output side (or the activation is not SiLU) the SwiGLU is not fused:
launch 1 writes [gate | up], which is unrotated and activated in torch, and down's input transform
is a launch of its own (also when its Hadamard block is below launch 1's 32 outputs); a rotated down
output side is unrotated and cast after launch 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import gemv_tc
from .gemm import GEMV_BN, GEMV_MAX_ROWS, dot_dtype, gemm, gemm_bn, gemv_launch, gemv_split, max_block_m
from .hadamard import transform
from .launch import launch

ALIGN_CHUNK = 1024  # (token, slot) pairs `align` sorts per step in registers


@triton.jit
def _align_kernel(idx_ptr, ids_ptr, eid_ptr, base_ptr, N, N_EXPERTS, N_BLOCKS,
                  BM: tl.constexpr, EP: tl.constexpr, CH: tl.constexpr, LOGCH: tl.constexpr, FB: tl.constexpr):
    """`align` in one program (see there), no host sync. Pass 1 counts the pairs per expert (a histogram per
    chunk of CH pairs; an index outside [0, N_EXPERTS) goes to bin EP - 1, never an expert) and pads the
    counts to BM; then every block gets its expert (-1 past the last) and padding ids. Pass 2 sorts each
    chunk by (expert, position): a pair's place is its expert's start + the pairs of that expert in earlier
    chunks + its rank in the sorted chunk, so the order within an expert is the flat order (stable)."""
    bins = tl.arange(0, EP)
    j = tl.arange(0, CH)
    used = bins < N_EXPERTS
    counts = tl.zeros((EP,), tl.int32)
    for c0 in range(0, N, CH):
        key = tl.load(idx_ptr + c0 + j, mask=c0 + j < N, other=-1)
        counts += tl.histogram(tl.where((key >= 0) & (key < N_EXPERTS), key, EP - 1).to(tl.int32), EP)
    padded = tl.where(used, (counts + BM - 1) // BM * BM, 0)
    pad_end = tl.cumsum(padded, 0)
    for b0 in range(0, N_BLOCKS, FB):
        b = b0 + tl.arange(0, FB)
        e = tl.sum(((pad_end[None, :] <= (b * BM)[:, None]) & used[None, :]).to(tl.int32), 1)
        tl.store(eid_ptr + b, tl.where(e < N_EXPERTS, e, -1), mask=b < N_BLOCKS)
        r = b[:, None] * BM + tl.arange(0, BM)[None, :]
        tl.store(ids_ptr + r, tl.full((FB, BM), 0, tl.int32) + N, mask=(b < N_BLOCKS)[:, None])
    run = pad_end - padded  # next free place of each expert
    for c0 in range(0, N, CH):
        key = tl.load(idx_ptr + c0 + j, mask=c0 + j < N, other=-1)
        key = tl.where((key >= 0) & (key < N_EXPERTS), key, EP - 1).to(tl.int32)
        hist = tl.histogram(key, EP)
        # the barriers order the padding stores and the last chunk's reads of base before these stores
        tl.debug_barrier()
        tl.store(base_ptr + bins, run - (tl.cumsum(hist, 0) - hist))  # place of the chunk's sorted position 0
        tl.debug_barrier()
        s = tl.sort(key * CH + j)
        k = s >> LOGCH
        tl.store(ids_ptr + tl.load(base_ptr + k) + j, c0 + (s & (CH - 1)), mask=k < N_EXPERTS)
        run += hist


def align(top_k_index: torch.Tensor, num_experts: int, block_m: int):
    """Sort (token, slot) pairs by expert, padding every expert's run to block_m: one Triton launch.

    Returns ids [n_blocks*block_m] (flat index token*K + slot, T*K marks padding; within an expert in flat
    order) and expert_ids [n_blocks] (-1 for unused trailing blocks), n_blocks = ceil(T*K / block_m) +
    min(E, T*K), an upper bound known without reading the routing. Indices outside [0, E) are dropped.
    Contract and output of `reference.align`.
    """
    flat = top_k_index.reshape(-1)
    n = flat.numel()
    n_blocks = triton.cdiv(n, block_m) + min(num_experts, n)
    ep = triton.next_power_of_2(num_experts + 1)
    buf = torch.empty(n_blocks * block_m + n_blocks + ep, dtype=torch.int32, device=flat.device)
    ids, expert_ids = buf[:n_blocks * block_m], buf[n_blocks * block_m:n_blocks * (block_m + 1)]
    if n:
        ch = max(16, min(ALIGN_CHUNK, triton.next_power_of_2(n)))
        launch(_align_kernel, (1,), flat, ids, expert_ids, buf[n_blocks * (block_m + 1):], n, num_experts,
               n_blocks, BM=block_m, EP=ep, CH=ch, LOGCH=ch.bit_length() - 1,
               FB=max(1, min(triton.next_power_of_2(n_blocks), 4096 // block_m, 4096 // ep)))
    return ids, expert_ids


def routed_block_m(pairs: int, experts: int, device: torch.device) -> int:
    """Rows per block of the routed GEMM: each block decodes its expert's weight again, 8.2 instructions a weight
    for 16 rows, 12.6-13.4 for 64 (bench/sass.py, sm_90), so from 32 (token, slot) pairs per expert on average
    64-row blocks decode less despite the padding (28B at 1024 tokens: 1131 -> 617 us predicted). 16 on GPUs
    whose 64-row blocks spill (`gemm.max_block_m`); 32-row SwiGLU blocks take 252 registers and 27 a weight."""
    return 64 if pairs >= 32 * experts and max_block_m(device) >= 64 else 16


def qmoe(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up, down,
         act=F.silu, block_m: int | None = None, decode: str | None = None) -> torch.Tensor:
    """Triton twin of `reference.qmoe` (same contract); decode: see `gemm.DECODE`; block_m: rows per routed GEMM
    block (default `routed_block_m`)."""
    T, K = top_k_index.shape
    E = gate_up.shape[0]
    H_out, inter = down.shape[-2], down.shape[-1]
    if T == 0:
        return torch.zeros(0, H_out, dtype=hidden.dtype, device=hidden.device)
    if gemv_tc.moe_supported(hidden, gate_up, down, act):
        return gemv_tc.qmoe_tc(hidden, top_k_index, top_k_weights, gate_up, down)
    if gemv_tc.moe_sorted_supported(hidden, top_k_index, gate_up, down, act):
        ids, expert_ids = align(top_k_index, E, gemv_tc.sorted_block(top_k_index, E))
        return gemv_tc.qmoe_tc(hidden, top_k_index, top_k_weights, gate_up, down, (ids, expert_ids))
    if T <= GEMV_MAX_ROWS:
        return _qmoe_gemv(hidden, top_k_index, top_k_weights, gate_up, down, act)
    ddt = dot_dtype(hidden.dtype, hidden.device)
    dev = hidden.device
    block_m = block_m or routed_block_m(T * K, E, dev)
    ids, expert_ids = align(top_k_index, E, block_m)
    rows = ids.shape[0]
    finish = down.signs_out is None
    swiglu = gate_up.signs_out is None and act is F.silu
    # launch 1's output blocks tile down's padded input, each inside one Hadamard block
    bn = gemm_bn(inter, inter)
    fuse_had = swiglu and down.had_in >= bn and triton.cdiv(inter, bn) * bn == down.signs_in.shape[0]
    h_pad = down.trellis.shape[-3] * 16
    n_cols = triton.cdiv(h_pad, gemm_bn(h_pad))
    groups = expert_ids.shape[0] * (down.signs_in.shape[0] // down.had_in) if fuse_had else 0
    # one zeroed buffer: [y (fp32 weighted sum over slots) | down's tickets per output block | launch 1's tickets]
    scratch = torch.empty(T * h_pad + n_cols * finish + groups, dtype=torch.float32, device=dev)
    y = scratch[:T * h_pad].view(T, h_pad)
    xr = transform(hidden, gate_up.signs_in, gate_up.had_in, ddt, zero=scratch)
    # padding rows of h stay unwritten: launch 2 masks them (ids >= T*K) and never reads them
    if swiglu:
        h = torch.empty(rows, inter, dtype=torch.float32, device=dev)
        hr = torch.empty(rows, down.signs_in.shape[0], dtype=ddt, device=dev) if fuse_had else None
        gemm(xr, gate_up.trellis, gate_up.scales, gate_up, n_out=inter, out=h, block_m=block_m,
             expert_ids=expert_ids, ids=ids, n_valid=T * K, top_k=K, gather_a=True, gate_off=inter,
             decode=decode, had=(hr, down.signs_in, down.had_in) if fuse_had else None,
             counters=scratch[T * h_pad + n_cols * finish:].view(torch.int32) if fuse_had else None)
    else:
        gu_pad = gate_up.trellis.shape[-3] * 16
        gu = torch.zeros(rows, gu_pad, dtype=torch.float32, device=dev)  # act() of padding rows: finite
        gemm(xr, gate_up.trellis, gate_up.scales, gate_up, n_out=gu_pad, out=gu, block_m=block_m,
             expert_ids=expert_ids, ids=ids, n_valid=T * K, top_k=K, gather_a=True, decode=decode)
        if gate_up.signs_out is not None:
            gu = transform(gu, gate_up.signs_out, gate_up.had_out, sign_after=True)
        h = act(gu[:, :inter]) * gu[:, inter:2 * inter]
    if not fuse_had:
        hr = transform(h, down.signs_in, down.had_in, ddt)
    out = torch.empty(T, H_out, dtype=hidden.dtype, device=dev) if finish else None
    gemm(hr, down.trellis, down.scales, down, n_out=h_pad, out=y, block_m=block_m, expert_ids=expert_ids,
         ids=ids, n_valid=T * K, top_k=K, scatter_y=True, decode=decode, weights=top_k_weights.reshape(-1),
         finish=out, counters=scratch[T * h_pad:].view(torch.int32) if finish else None, n_tok=T)
    if finish:
        return out
    y = transform(y, down.signs_out, down.had_out, sign_after=True)
    return y[:, :H_out].to(hidden.dtype)


def _qmoe_gemv(hidden, top_k_index, top_k_weights, gate_up, down, act):
    """A few tokens (decode): one GEMV program row per (token, slot), no sorting, weighted sum fused.

    Three launches at one token: the input transform (which also zeroes the fp32 output and the ticket
    counters), gate_up with SwiGLU (whose last program per slot and Hadamard block writes down's input
    transform), down (routing weight and sum over slots by atomics; the last program per output block
    casts it into the output). No host sync, no state kept between calls: the layer can be captured in a
    CUDA graph. A rotated output side, another activation or a Hadamard block below 32 take the unfused
    steps (transform / cast in their own launches).
    """
    T, K = top_k_index.shape
    slots = T * K
    H_out, inter = down.shape[-2], down.shape[-1]
    flat = top_k_index.reshape(-1)
    dev = hidden.device
    swiglu = gate_up.signs_out is None and act is F.silu
    # launch 1's output blocks tile down's padded input, each inside one Hadamard block
    fuse_had = swiglu and down.had_in >= GEMV_BN and triton.cdiv(inter, GEMV_BN) * GEMV_BN == down.signs_in.shape[0]
    finish = down.signs_out is None
    h_pad = down.trellis.shape[-3] * 16
    n_blocks = triton.cdiv(h_pad, GEMV_BN)
    groups = slots * (down.signs_in.shape[0] // down.had_in) if fuse_had else 0
    # one zeroed buffer: [y (fp32 sum over slots) | down's tickets per output block | launch 1's tickets]
    scratch = torch.empty(T * h_pad + n_blocks * finish + groups, dtype=torch.float32, device=dev)
    y = scratch[:T * h_pad].view(T, h_pad)
    xr = transform(hidden, gate_up.signs_in, gate_up.had_in, torch.float32, zero=scratch)
    if swiglu:
        h = torch.empty(slots, inter, dtype=torch.float32, device=dev)
        hr = torch.empty(slots, down.signs_in.shape[0], dtype=torch.float32, device=dev) if fuse_had else None
        gemv_launch(xr, gate_up, tr=gate_up.trellis, scales=gate_up.scales, y=h, n_out=inter, split=1, rows=slots,
                    expert_ids=flat, top_k=K, gather_a=True, gate_off=inter,
                    had=(hr, down.signs_in, down.had_in) if fuse_had else None,
                    counters=scratch[T * h_pad + n_blocks * finish:].view(torch.int32) if fuse_had else None)
    else:
        gu_pad = gate_up.trellis.shape[-3] * 16
        gu = torch.empty(slots, gu_pad, dtype=torch.float32, device=dev)
        gemv_launch(xr, gate_up, tr=gate_up.trellis, scales=gate_up.scales, y=gu, n_out=gu_pad, split=1, rows=slots,
                    expert_ids=flat, top_k=K, gather_a=True)
        if gate_up.signs_out is not None:
            gu = transform(gu, gate_up.signs_out, gate_up.had_out, sign_after=True)
        h = act(gu[:, :inter]) * gu[:, inter:2 * inter]
    if not fuse_had:
        hr = transform(h, down.signs_in, down.had_in, torch.float32)
    split = gemv_split(dev, slots * n_blocks, down.trellis.shape[-2])
    out = torch.empty(T, H_out, dtype=hidden.dtype, device=dev) if finish else None
    gemv_launch(hr, down, tr=down.trellis, scales=down.scales, y=y, n_out=h_pad, split=split, rows=slots,
                expert_ids=flat, weights=top_k_weights.reshape(-1), top_k=K, out=out, n_tok=T,
                counters=scratch[T * h_pad:T * h_pad + n_blocks].view(torch.int32) if finish else None)
    if finish:
        return out
    y = transform(y, down.signs_out, down.had_out, sign_after=True)
    return y[:, :H_out].to(hidden.dtype)
