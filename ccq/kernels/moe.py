"""Fused routed-expert MoE on packed trellis weights (Triton).

Up to 4 tokens (`_qmoe_gemv`, the decode step): routed GEMVs, one program row per (token, slot),
no sorting, three launches (see there).

More tokens, flow for T tokens, top-K routing, E experts:
1. `align`: the T*K (token, slot) pairs are sorted by expert and each expert's run is padded
   to the block size BM, so every block of BM rows belongs to one expert (no host sync).
2. The gate_up input transform H(s * x) is shared by all experts of the stack: done once per token.
3. Launch 1: per block, gather the tokens' rotated rows, decode the expert's gate and up rows
   inside the K loop, apply SwiGLU, write the intermediate in sorted order.
4. down's input transform on the intermediate, then launch 2: per block, decode the expert's
   down weight, write each row to its flat (token, slot) place; the K slots are then summed
   with their routing weights.
If gate_up rotates its output side (or the activation is not SiLU) the SwiGLU is not fused:
launch 1 writes [gate | up], which is unrotated and activated in torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from .gemm import GEMV_BN, GEMV_MAX_ROWS, dot_dtype, gemm, gemv_launch, gemv_split
from .hadamard import transform


def align(top_k_index: torch.Tensor, num_experts: int, block_m: int):
    """Sort (token, slot) pairs by expert, padding every expert's run to block_m.

    Returns ids [n_blocks*block_m] (flat index token*K + slot, T*K marks padding) and
    expert_ids [n_blocks] (-1 for unused trailing blocks). Indices >= num_experts are dropped.
    """
    flat = top_k_index.reshape(-1).long()
    n = flat.numel()
    dev = flat.device
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    key_sorted = key[order]
    # scatter_add rather than bincount / boolean indexing: no host sync, CUDA-graph safe
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    n_blocks = triton.cdiv(n, block_m) + min(num_experts, n)
    e_sorted = key_sorted.clamp(max=num_experts - 1)
    pos = pad_start[e_sorted] + torch.arange(n, device=dev) - cnt_start[e_sorted]
    pos = torch.where(key_sorted < num_experts, pos, n_blocks * block_m)  # dropped slots -> spare last entry
    ids = torch.full((n_blocks * block_m + 1,), n, dtype=torch.int32, device=dev)
    ids = ids.scatter_(0, pos, order.to(torch.int32))[:-1]
    e_of_block = torch.searchsorted(pad_end, torch.arange(n_blocks, device=dev) * block_m, right=True)
    expert_ids = torch.where(e_of_block < num_experts, e_of_block, -1).to(torch.int32)
    return ids, expert_ids


def qmoe(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up, down,
         act=F.silu, block_m: int = 16, decode: str | None = None) -> torch.Tensor:
    """Triton twin of `reference.qmoe` (same contract); decode: see `gemm.DECODE`."""
    T, K = top_k_index.shape
    E = gate_up.shape[0]
    H_out, inter = down.shape[-2], down.shape[-1]
    if T == 0:
        return torch.zeros(0, H_out, dtype=hidden.dtype, device=hidden.device)
    if T <= GEMV_MAX_ROWS:
        return _qmoe_gemv(hidden, top_k_index, top_k_weights, gate_up, down, act)
    ddt = dot_dtype(hidden.dtype, hidden.device)
    ids, expert_ids = align(top_k_index, E, block_m)
    rows = ids.shape[0]
    xr = transform(hidden, gate_up.signs_in, gate_up.had_in, ddt)
    fuse = gate_up.signs_out is None and act is F.silu
    if fuse:
        h = torch.zeros(rows, inter, dtype=torch.float32, device=hidden.device)
        gemm(xr, gate_up.trellis, gate_up.scales, gate_up, n_out=inter, out=h, block_m=block_m,
             expert_ids=expert_ids, ids=ids, n_valid=T * K, top_k=K, gather_a=True, gate_off=inter,
             decode=decode)
    else:
        gu_pad = gate_up.trellis.shape[-3] * 16
        gu = torch.zeros(rows, gu_pad, dtype=torch.float32, device=hidden.device)
        gemm(xr, gate_up.trellis, gate_up.scales, gate_up, n_out=gu_pad, out=gu, block_m=block_m,
             expert_ids=expert_ids, ids=ids, n_valid=T * K, top_k=K, gather_a=True, decode=decode)
        if gate_up.signs_out is not None:
            gu = transform(gu, gate_up.signs_out, gate_up.had_out, sign_after=True)
        h = act(gu[:, :inter]) * gu[:, inter:2 * inter]
    hr = transform(h, down.signs_in, down.had_in, ddt)
    h_pad = down.trellis.shape[-3] * 16
    y = torch.zeros(T * K, h_pad, dtype=torch.float32, device=hidden.device)
    gemm(hr, down.trellis, down.scales, down, n_out=h_pad, out=y, block_m=block_m, expert_ids=expert_ids,
         ids=ids, n_valid=T * K, top_k=K, scatter_y=True, decode=decode)
    if down.signs_out is not None:
        y = transform(y, down.signs_out, down.had_out, sign_after=True)
    y = y[:, :H_out].view(T, K, H_out) * top_k_weights.float()[..., None]
    return y.sum(1).to(hidden.dtype)


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
