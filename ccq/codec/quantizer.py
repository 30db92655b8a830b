"""`quantize_tensor`: rotate, pick scales, search the trellis tile by tile (BlockLDLQ
when a Hessian is given), refit the scales, and pack.

The error-feedback loop is GPTQ/LDLQ with blocks of 16 input columns: with the upper
Cholesky factor U of H^-1, a block's error E is mapped through U_bb^-1 and subtracted
from the later columns via U_b,rest, exactly as GPTQ does one column at a time.
"""

from __future__ import annotations

import importlib
import os

import torch

from .codes import code_table
from .config import TrellisConfig
from .hadamard import fwht, hadamard_block_size, random_signs, rotate_in
from .tensor import TILE, QuantizedTensor, make_meta, matrix_to_tiles, tiles_to_matrix
from .bitstream import states_to_words
from .viterbi_torch import viterbi_tiles_torch

SEARCH_BACKENDS = ("numba", "triton", "torch")


def search_backend(device: torch.device) -> str:
    """The Viterbi search for `device`: `CCQ_SEARCH` when set, else Triton on CUDA and numba elsewhere."""
    forced = os.environ.get("CCQ_SEARCH", "").strip().lower()
    if forced in SEARCH_BACKENDS:
        return forced
    if forced:
        raise ValueError(f"CCQ_SEARCH must be one of {', '.join(SEARCH_BACKENDS)}, got {forced!r}")
    return "triton" if device.type == "cuda" else "numba"


def _triton_search():
    """viterbi_triton, imported on first use so that TRITON_INTERPRET set before it applies."""
    return importlib.import_module(".viterbi_triton", __package__).viterbi_tiles_triton


def _pad16(n: int) -> int:
    return -(-n // TILE) * TILE


def _check_finite(t: torch.Tensor, what: str):
    bad = ~torch.isfinite(t)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{what} has a non-finite value ({float(t[idx])}) at index {idx}")


class _Searcher:
    """Runs the Viterbi search (backend: `search_backend`) over [N, 256] target/weight arrays;
    every call gets all the tiles it searches at once (one launch per pass on the GPU)."""

    def __init__(self, cfg: TrellisConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.backend = search_backend(device)
        if self.backend == "triton":
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "") != "1":
                raise RuntimeError(f"CCQ_SEARCH=triton needs a CUDA device (got {device.type}); set "
                                   "TRITON_INTERPRET=1 to run the kernel in Triton's interpreter")
            self.triton = _triton_search()
        self.table = code_table(cfg.code, cfg.L)
        self.table_t = torch.from_numpy(self.table).to(device)

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        k, L = self.cfg.bits, self.cfg.L
        if self.backend == "triton":
            states, _ = self.triton(x.to(self.device), w.to(self.device), self.cfg.code, k, L)
            return states.cpu()
        if self.backend == "torch":
            states, _ = viterbi_tiles_torch(x.to(self.device), w.to(self.device), self.table_t, k, L)
            return states.cpu()
        # numba is imported on first use: importing ccq must not load llvmlite (vLLM's CPU worker,
        # which imports ccq through its plugin, scans every loaded module and fails on llvmlite's)
        from .viterbi_numba import viterbi_tiles

        states, _ = viterbi_tiles(x.cpu().numpy(), w.cpu().numpy(), self.table, k, L,
                                  self.cfg.tailbite_candidates)
        return torch.from_numpy(states)

    def values(self, states: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.table)[states.long()]


def _rotate(w: torch.Tensor, signs_in, had_in, signs_out, had_out) -> torch.Tensor:
    """Rotate [..., out, in] weights: the input side always, the output side when asked."""
    w = rotate_in(w, signs_in, had_in)
    if signs_out is not None:
        w = fwht((w * signs_out.to(w.dtype)[:, None]).transpose(-1, -2), had_out).transpose(-1, -2)
    return w


def _search_scale(w: torch.Tensor, rms: torch.Tensor, cfg: TrellisConfig, search: _Searcher) -> float:
    """Pick the factor of RMS/RMS(code) that gives the lowest MSE on a sample of tiles."""
    tiles = matrix_to_tiles(w)
    rms_t = matrix_to_tiles(rms[..., None].expand_as(w))
    flat, flat_rms = tiles.reshape(-1, TILE * TILE), rms_t.reshape(-1, TILE * TILE)
    g = torch.Generator().manual_seed(1234)
    # a sample of at most 1/8 of the tiles keeps the search cheap next to the real pass
    n = min(cfg.scale_sample_tiles, max(1, flat.shape[0] // 8))
    pick = torch.randperm(flat.shape[0], generator=g)[:n]
    x, r = flat[pick], flat_rms[pick]

    def errors(factors):  # one batched search over all candidate factors
        s = torch.cat([a * r for a in factors])
        xs = x.repeat(len(factors), 1)
        err = ((search.values(search(xs / s, s * s)) * s - xs) ** 2).reshape(len(factors), -1).sum(1)
        return dict(zip(factors, err.tolist()))

    grid = sorted(cfg.scale_grid)
    tried = errors(grid)
    best = min(tried, key=tried.get)
    if len(grid) > 1:  # refine halfway to the neighbouring grid points
        step = min(b - a for a, b in zip(grid, grid[1:])) / 2
        tried.update(errors([a for a in (best - step, best + step) if a > 0]))
    return min(tried, key=tried.get)


def incoherence(out_p: int, in_p: int, cfg: TrellisConfig, seed: int):
    """(signs_in, had_in, signs_out, had_out) of a padded [out_p, in_p] weight: the input side
    always, the output side when `cfg.rotate_output` (signs_out None and had_out 0 otherwise)."""
    signs_out, had_out = None, 0
    if cfg.rotate_output:
        had_out = hadamard_block_size(out_p, cfg.hadamard_block)
        signs_out = random_signs(out_p, seed + 1)
    return random_signs(in_p, seed), hadamard_block_size(in_p, cfg.hadamard_block), signs_out, had_out


def _quantize_stack(w: torch.Tensor, hessian: torch.Tensor | None, cfg: TrellisConfig,
                    search: _Searcher, rot) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded matrices [E, out_p, in_p] (Hessians [1 or E, in_p, in_p]) -> (states [E, ot, it, 256]
    int32, scales fp16 [E, out_p]). All experts' tiles of a column block go to one search call."""
    E, out_p, in_p = w.shape
    wr = _rotate(w.double(), *rot).float()
    rms = wr.pow(2).mean(dim=-1).sqrt().clamp_min(1e-12)
    scale = _search_scale(wr, rms, cfg, search) * rms
    if hessian is None:
        tiles = matrix_to_tiles(wr / scale[..., None]).reshape(-1, TILE * TILE)
        tw = matrix_to_tiles((scale * scale)[..., None].expand_as(wr)).reshape(-1, TILE * TILE)
        states = search(tiles, tw).reshape(E, out_p // TILE, in_p // TILE, TILE * TILE)
        codes = tiles_to_matrix(search.values(states))
        num = (codes * wr).sum(-1)
        den = (codes * codes).sum(-1)
    else:
        h = _rotate(_rotate(hessian.double(), *rot[:2], None, None).transpose(-1, -2), *rot[:2], None, None)
        h = h + torch.eye(in_p, dtype=h.dtype) * (cfg.damp * h.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12))[:, None, None]
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
        tw = matrix_to_tiles((scale * scale)[..., None].expand(E, out_p, TILE)).reshape(-1, TILE * TILE)
        work = wr.clone()
        codes = torch.empty_like(wr)
        states = torch.empty((E, out_p // TILE, in_p // TILE, TILE * TILE), dtype=torch.int32)
        for j in range(in_p // TILE):
            cols, rest = slice(j * TILE, (j + 1) * TILE), slice((j + 1) * TILE, None)
            target = work[..., cols]
            st = search(matrix_to_tiles(target / scale[..., None]).reshape(-1, TILE * TILE), tw)
            states[:, :, j] = st.reshape(E, out_p // TILE, TILE * TILE)
            codes[..., cols] = tiles_to_matrix(search.values(st).reshape(E, out_p // TILE, 1, TILE * TILE))
            err = torch.linalg.solve_triangular(u[:, cols, cols], target - codes[..., cols] * scale[..., None],
                                                upper=True, left=False)
            work[..., rest] -= err @ u[:, cols, rest]
        hc = codes.double() @ h
        num = (hc * wr.double()).sum(-1).float()
        den = (hc * codes.double()).sum(-1).float()
    refit = torch.where(den > 0, num / den.clamp_min(1e-30), scale)
    return states, refit.to(torch.float16)


def quantize_tensor(weight: torch.Tensor, bits: int = 2, hessian: torch.Tensor | None = None, *,
                    seed: int = 0, config: TrellisConfig | None = None, **options) -> QuantizedTensor:
    """Quantize a weight [out, in] (or a stack of experts [E, out, in]) with the trellis codec.

    hessian: None (data-free), [in, in], or for a stack [in, in] shared / [E, in, in] per expert.
    A 2-D weight also takes [G, in, in]: row-group Hessians (`row_groups`), group g's rows quantized
    with H[g] (the loss-weighted Hessians of `ccq.calibration.fisher`); not with `rotate_output`.
    options: any field of :class:`TrellisConfig` (L, code, hadamard_block, rotate_output, ...).
    The same input, seed and options always give the same bytes.
    """
    cfg = config or TrellisConfig(bits=bits, **options)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() not in (2, 3):
        raise ValueError(f"weight must be 2-D [out, in] or 3-D [experts, out, in], got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)})")
    _check_finite(weight, "weight")
    stack = weight.dim() == 3
    w3 = weight if stack else weight[None]
    E, out, inp = w3.shape
    out_p, in_p = _pad16(out), _pad16(inp)
    groups = 0  # row groups of a 2-D weight, each with its own Hessian
    if hessian is not None:
        if not isinstance(hessian, torch.Tensor):
            raise TypeError(f"hessian must be a torch.Tensor, got {type(hessian).__name__}")
        ok = hessian.shape == (inp, inp) or (hessian.dim() == 3 and hessian.shape[1:] == (inp, inp) and
                                             (hessian.shape[0] == E if stack else True))
        if not ok:
            raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}: "
                             f"expected ({inp}, {inp})" + (f" or ({E}, {inp}, {inp})" if stack else
                                                           f" or (groups, {inp}, {inp})"))
        _check_finite(hessian, "hessian")
        if not stack and hessian.dim() == 3:
            groups = hessian.shape[0]
            if out_p % (TILE * groups) or cfg.rotate_output:
                raise ValueError(f"{groups} row-group Hessians need {out_p} padded rows to split into whole "
                                 f"tiles per group ({row_groups(out, groups)} groups do) and no rotate_output")
    rot = incoherence(out_p, in_p, cfg, seed)
    if groups:  # the groups' rows as a stack of `groups` matrices with one Hessian each
        w3 = torch.zeros(out_p, inp, dtype=weight.dtype)
        w3[:out] = weight
        w3, E, out = w3.reshape(groups, out_p // groups, inp), groups, out_p // groups
        out_p = out
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    search = _Searcher(cfg, device)
    # experts in chunks of about 2^24 weights: one search call per column block for the chunk,
    # memory bounded to a few copies of the chunk
    chunk = max(1, (1 << 24) // (out_p * in_p))
    words, scales = [], []
    for e0 in range(0, E, chunk):
        e1 = min(E, e0 + chunk)
        w = torch.zeros(e1 - e0, out_p, in_p, dtype=torch.float32)
        w[:, :out, :inp] = w3[e0:e1].float().cpu()
        h = None
        if hessian is not None:
            he = hessian[e0:e1] if hessian.dim() == 3 else hessian[None]
            h = torch.zeros(he.shape[0], in_p, in_p, dtype=torch.float64)
            h[:, :inp, :inp] = he.double().cpu()
        states, sc = _quantize_stack(w, h, cfg, search, rot)
        words.append(torch.from_numpy(states_to_words(states.numpy(), cfg.bits)))
        scales.append(sc)
    trellis = torch.cat(words) if stack or groups else words[0][0]
    sc = torch.cat(scales) if stack or groups else scales[0][0]
    if groups:
        trellis, sc = trellis.flatten(0, 1), sc.flatten()
    signs_in, had_in, signs_out, had_out = rot
    return QuantizedTensor(trellis.contiguous(), sc.contiguous(), signs_in, signs_out,
                           make_meta(tuple(weight.shape), cfg, had_in, had_out))


def row_groups(out: int, groups: int) -> int:
    """The most row groups, at most `groups`, that split a weight of `out` rows (padded to whole tiles)
    into equal runs of whole tiles: what `quantize_tensor` takes row-group Hessians for."""
    tiles = _pad16(out) // TILE
    return max(g for g in range(1, max(1, min(groups, tiles)) + 1) if tiles % g == 0)


def proxy_loss(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None = None,
               row_weight: torch.Tensor | float = 1.0) -> float:
    """tr(dW H dW^T) (or the plain squared error without H), summed over experts; `row_weight` ([out, 1]
    or a number) weights each output row's term."""
    d = (weight.double() - approx.double()).reshape(-1, weight.shape[-2], weight.shape[-1])
    if hessian is None:
        return float((d * d * row_weight).sum())
    h = hessian.double()
    rw = row_weight[:, 0] if isinstance(row_weight, torch.Tensor) else row_weight
    if weight.dim() == 2 and h.dim() == 3:  # row-group Hessians: group g's rows against H[g]
        g, out = h.shape[0], weight.shape[0]
        d = torch.nn.functional.pad(d[0], (0, 0, 0, _pad16(out) - out)).reshape(g, -1, weight.shape[1])
        if isinstance(rw, torch.Tensor):
            rw = torch.nn.functional.pad(rw.double(), (0, _pad16(out) - out)).reshape(g, -1)
    eq = "eoi,ij,eoj->eo" if h.dim() == 2 else "eoi,eij,eoj->eo"
    return float((torch.einsum(eq, d, h, d) * rw).sum())
