"""Tail-biting Viterbi search in plain torch, batched over tiles: the GPU path.

Same algorithm and tie-breaking (lowest predecessor index wins) as the numba search.
On CUDA the whole batch of tiles advances one step per iteration; back-pointers live
in one uint8 tensor [T, batch, 2**(L-k)].
"""

from __future__ import annotations

import torch


def _search(x, w, code, k, L, overlap):
    """x, w: [B, T]; overlap: None or int64 [B]. Returns (states [B, T] int64, cost [B])."""
    B, T = x.shape
    K, Q = 1 << k, 1 << (L - k)
    S = 1 << L
    states_all = torch.arange(S, device=x.device)
    cost = w[:, :1] * (x[:, :1] - code[None]) ** 2
    if overlap is not None:
        cost = torch.where((states_all[None] >> k) == overlap[:, None], cost, torch.inf)
    bp = torch.empty((T, B, Q), dtype=torch.uint8, device=x.device)
    for t in range(1, T):
        best, arg = cost.view(B, K, Q).min(dim=1)
        bp[t] = arg.to(torch.uint8)
        cost = best.repeat_interleave(K, dim=1) + w[:, t : t + 1] * (x[:, t : t + 1] - code[None]) ** 2
    if overlap is not None:
        ends = (torch.arange(K, device=x.device)[None] << (L - k)) | overlap[:, None]
        c, j = cost.gather(1, ends).min(dim=1)
        s = ends.gather(1, j[:, None])[:, 0]
    else:
        c, s = cost.min(dim=1)
    out = torch.empty((B, T), dtype=torch.int64, device=x.device)
    out[:, T - 1] = s
    rows = torch.arange(B, device=x.device)
    for t in range(T - 1, 0, -1):
        m = s >> k
        s = m | (bp[t, rows, m].to(torch.int64) << (L - k))
        out[:, t - 1] = s
    return out, c


@torch.no_grad()
def viterbi_tiles_torch(x: torch.Tensor, w: torch.Tensor, code: torch.Tensor, k: int, L: int,
                        batch: int = 256):
    """Search N tail-biting sequences on x's device; returns (states int32 [N, T], cost [N])."""
    x = x.float()
    w = torch.broadcast_to(torch.as_tensor(w, dtype=torch.float32, device=x.device), x.shape)
    code = code.to(x.device, torch.float32)
    N, T = x.shape
    half = T // 2
    states = torch.empty((N, T), dtype=torch.int32, device=x.device)
    costs = torch.empty(N, dtype=torch.float32, device=x.device)
    for i in range(0, N, batch):
        xb, wb = x[i : i + batch], w[i : i + batch]
        rot, _ = _search(xb.roll(-half, dims=1), wb.roll(-half, dims=1), code, k, L, None)
        overlap = rot[:, half] >> k
        st, c = _search(xb, wb, code, k, L, overlap)
        states[i : i + batch] = st.to(torch.int32)
        costs[i : i + batch] = c
    return states, costs
