"""The scalar peers ccq is compared with on real weights: round-to-nearest with min/max groups and
GPTQ (Frantar et al. 2022, the reference algorithm: columns in order, lazy blocks of 128, groups
whose scale/zero are fixed when the group's first column is reached, damping 1% of the mean
diagonal). Both store an fp16 scale and zero per group, so bpw = bits + 32 / group.
"""

from __future__ import annotations

import torch


def _grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max scale and zero per row of w [rows, cols] (fp16-rounded, as stored)."""
    lo, hi = w.min(-1).values.clamp(max=0), w.max(-1).values.clamp(min=0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8).half().float()
    zero = torch.round(-lo / scale).clamp(0, 2 ** bits - 1)
    return scale[:, None], zero[:, None]


def _round(w, scale, zero, bits):
    return (torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1) - zero) * scale


def rtn(w: torch.Tensor, bits: int, group: int = 64) -> torch.Tensor:
    """Round-to-nearest with min/max groups of `group` input columns; returns the dequantized weight."""
    out, inp = w.shape
    wf = w.float()
    res = torch.empty_like(wf)
    for c in range(0, inp, group):
        g = wf[:, c:c + group]
        scale, zero = _grid(g, bits)
        res[:, c:c + group] = _round(g, scale, zero, bits)
    return res


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int = 128, damp: float = 0.01,
         block: int = 128) -> torch.Tensor:
    """GPTQ of w [out, in] with input Hessian [in, in]; returns the dequantized weight."""
    if block % group:
        raise ValueError(f"group {group} must divide block {block}")
    W = w.double().clone()
    H = hessian.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += torch.eye(H.shape[0], dtype=H.dtype) * damp * H.diagonal().mean()
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    n = W.shape[1]
    scale = zero = None
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        W1, E1 = W[:, b0:b1].clone(), torch.zeros_like(W[:, b0:b1])
        for i in range(b1 - b0):
            c = b0 + i
            if c % group == 0:  # the group's grid from its error-updated weights (group divides block)
                scale, zero = (t.double() for t in _grid(W1[:, i:i + group].float(), bits))
            q = _round(W1[:, i:i + 1], scale, zero, bits)
            Q[:, c:c + 1] = q
            err = (W1[:, i:i + 1] - q) / U[c, c]
            W1[:, i:] -= err @ U[c:c + 1, c:b1]
            E1[:, i:i + 1] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]
    return Q.float()


def peer_bpw(bits: int, group: int) -> float:
    return bits + 32 / group
