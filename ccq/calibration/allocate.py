"""Bits per module for a target average bits per weight (`--target-bpw`).

Each module's cost at each candidate bit width is its proxy loss tr(dW H dW^T) (the squared
weight error when there is no Hessian), measured by quantizing a fixed sample of its output rows
with the real codec and scaling up: rows are quantized independently given H, so the sample is an
unbiased estimate at a fraction of the search time. The bits are then chosen by a greedy
multiple-choice knapsack: start every module at its fewest bits and repeatedly take the upgrade
with the largest cost drop per extra byte (on each module's lower convex hull) that still fits the
byte budget. Up to the first upgrade that does not fit this is the Lagrangian optimum; in all
it is within one module's single upgrade of the best choice (the LP-relaxation bound).
"""

from __future__ import annotations

import heapq
import math

import torch

from ..codec import proxy_loss, quantize_tensor
from ..codec.tensor import packed_nbytes
from ..models.quantize import tensor_seed
from ..models.settings import QuantSettings

CANDIDATES = (2, 3, 4)


def sample_rows(weight: torch.Tensor, hessian: torch.Tensor | None, rows: int, experts: int = 4):
    """(w, h, factor): an evenly spaced sample of at most `rows` output rows (and `experts` experts of
    a stack) and the factor that scales its proxy loss to the whole weight."""
    *lead, out, _ = weight.shape
    idx = _row_index(out, rows)
    factor = out / idx.numel()
    w = weight[..., idx, :]
    if lead:
        eidx = torch.linspace(0, lead[0] - 1, min(experts, lead[0])).round().long().unique()
        factor *= lead[0] / eidx.numel()
        w = w[eidx]
        if hessian is not None and hessian.dim() == 3:
            hessian = hessian[eidx]
    return w, hessian, factor


def _row_index(out: int, rows: int) -> torch.Tensor:
    return torch.linspace(0, out - 1, min(rows, out)).round().long().unique()


def measure_costs(weight: torch.Tensor, hessian: torch.Tensor | None, settings: QuantSettings,
                  candidates=CANDIDATES, *, rows: int = 128, seed: int = 0, row_weight=None) -> dict[int, float]:
    """{bits: estimated tr(dW H dW^T) of the whole weight} at each candidate bit width; with
    `row_weight` ([out] tensor or a number: the outputs' Fisher, `ccq.calibration.fisher`) each
    output row's term is weighted by it."""
    w, h, factor = sample_rows(weight.detach().float(), hessian, rows)
    if row_weight is None:
        row_weight = 1.0
    elif isinstance(row_weight, torch.Tensor):
        row_weight = row_weight.double()[_row_index(weight.shape[-2], rows), None]  # the rows sampled
    costs = {}
    for b in candidates:
        approx = quantize_tensor(w, b, h, seed=seed, config=settings.codec_for(b)).dequantize()
        costs[b] = proxy_loss(w, approx, h, row_weight) * factor
    return costs


def choose_bits(costs: dict[str, dict[int, float]], sizes: dict[str, dict[int, int]], budget: int) -> dict[str, int]:
    """{module: bits} minimising the summed cost with summed bytes <= budget.

    costs/sizes: {module: {bits: cost or bytes}} over the same bit widths. Raises ValueError when
    even the fewest bits everywhere exceed the budget.
    """
    choice = {m: min(c) for m, c in costs.items()}
    used = sum(sizes[m][b] for m, b in choice.items())
    if used > budget:
        raise ValueError(f"the byte budget {budget} is below the smallest packed size {used} "
                         f"(every module at {min(min(c) for c in costs.values())} bits)")
    heap = []

    def push(m):  # the steepest next step from choice[m] along m's options with more bytes
        b0 = choice[m]
        best = None
        for b, c in costs[m].items():
            db = sizes[m][b] - sizes[m][b0]
            if db > 0 and c < costs[m][b0]:
                slope = (costs[m][b0] - c) / db
                if best is None or slope > best[0]:
                    best = (slope, b)
        if best:
            heapq.heappush(heap, (-best[0], m, best[1]))

    for m in costs:
        push(m)
    while heap:
        _, m, b = heapq.heappop(heap)
        extra = sizes[m][b] - sizes[m][choice[m]]
        if used + extra <= budget:
            choice[m] = b
            used += extra
            push(m)
        # else: too big now; m stays, and cheaper upgrades of other modules may still fit
    return choice


def allocate(weights: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]], settings: QuantSettings,
             fixed: dict[str, tuple[int, int]] | None = None, candidates=CANDIDATES, *, rows: int = 128,
             cost_fn=None) -> tuple[dict[str, int], dict]:
    """Choose bits for modules {module: [(weight, hessian or None), ...]} (a fused-experts module
    has two weights; a weight may be a zero-argument callable that loads it, so only one is in
    memory) so that they and the `fixed` modules ({module: (numel, bytes)}, bits set by the user)
    average at most `settings.target_bpw`. Returns ({module: bits}, {module: {bits: cost}}).

    cost_fn(key, weight, hessian) -> {bits: cost} replaces the measurement (key = f"{module}.{i}", the
    module's i-th weight): plans without weights, or costs measured beforehand (:func:`weight_costs`).
    """
    rotate_output = settings.codec.rotate_output
    fixed = fixed or {}
    costs, sizes, numel = {}, {}, sum(n for n, _ in fixed.values())
    for m, ws in weights.items():
        costs[m] = {b: 0.0 for b in candidates}
        sizes[m] = {b: 0 for b in candidates}
        for i, (w, h) in enumerate(ws):
            w = w() if callable(w) else w
            numel += w.numel()
            c = cost_fn(f"{m}.{i}", w, h) if cost_fn else measure_costs(w, h, settings, candidates, rows=rows,
                                                                        seed=tensor_seed(settings.seed, f"{m}.{i}"))
            for b in candidates:
                costs[m][b] += c[b]
                sizes[m][b] += packed_nbytes(tuple(w.shape), b, rotate_output)
    budget = int(numel * settings.target_bpw / 8) - sum(b for _, b in fixed.values())
    try:
        return choose_bits(costs, sizes, budget), costs
    except ValueError:
        raise _below_floor(settings, sum(min(s.values()) for s in sizes.values()), fixed, numel, candidates) from None


def _below_floor(settings: QuantSettings, free_bytes: int, fixed: dict, numel: int, candidates) -> ValueError:
    low = (free_bytes + sum(b for _, b in fixed.values())) * 8 / numel
    return ValueError(f"target bpw {settings.target_bpw} is below the smallest size this model packs to "
                      f"({low:.3f} bpw at {min(candidates)} bits)")


def module_weights(model: torch.nn.Module, names, hessians: dict | None = None, get=None) -> dict[str, list]:
    """{module: [(weight, hessian or None), ...]} of planned modules (hessians keyed by weight name,
    as HessianCapture gives them). get(parameter name) -> tensor: read the weights from a source
    checkpoint instead of the model (which may then live on the meta device); they come as loaders."""
    mods = dict(model.named_modules())
    out = {}
    for name in names:
        mod = mods[name]
        linear = isinstance(mod, torch.nn.Linear)
        keys = [name] if linear else [f"{name}.gate_up_proj", f"{name}.down_proj"]
        params = [f"{name}.weight"] if linear else keys

        def load(p):
            return (lambda: get(p)) if get is not None else model.get_parameter(p)

        out[name] = [(load(p), None if hessians is None else hessians.get(k)) for p, k in zip(params, keys)]
    return out


def weight_costs(model: torch.nn.Module, names, hessians: dict | None, settings: QuantSettings,
                 fisher: dict | None = None, candidates=CANDIDATES) -> dict[str, dict[int, float]]:
    """{f"{module}.{i}": {bits: cost}} of the modules `names` of a model whose weights are in memory, as
    :func:`allocate` measures them, the rows weighted by `fisher` ({weight name: F}, keyed as the
    Hessians) where given: for a pass that holds each module's statistics only for a while."""
    out, rows = {}, module_weights(model, names, fisher or {})  # the Fisher paired up as the Hessians are
    for m, ws in module_weights(model, names, hessians).items():
        for i, ((w, h), (_, f)) in enumerate(zip(ws, rows[m])):
            out[f"{m}.{i}"] = measure_costs(w, h, settings, candidates, seed=tensor_seed(settings.seed, f"{m}.{i}"),
                                            row_weight=f)
    return out


def allocate_model(model: torch.nn.Module, plan: dict[str, int], settings: QuantSettings,
                   hessians: dict | None = None, *, get=None, cost_fn=None, measure=None) -> dict[str, int]:
    """`plan` with the bits of every module that no override names chosen for `settings.target_bpw`
    (weights from the model, or read one at a time through `get` as in :func:`module_weights`; or
    measure(module names) -> the costs of :func:`weight_costs`, taken elsewhere, the model then only
    giving shapes)."""
    from fnmatch import fnmatchcase

    fixed_names = [n for n in plan if any(fnmatchcase(n, p) for p, _ in settings.overrides)]
    fixed = {}
    for n, ws in module_weights(model, fixed_names).items():  # shapes only
        fixed[n] = (sum(w.numel() for w, _ in ws),
                    sum(packed_nbytes(tuple(w.shape), plan[n], settings.codec.rotate_output) for w, _ in ws))
    free_names = [n for n in plan if n not in fixed]
    shapes = [tuple(w.shape) for ws in module_weights(model, free_names).values() for w, _ in ws]  # no loads
    numel = sum(math.prod(s) for s in shapes) + sum(n for n, _ in fixed.values())
    floor = sum(packed_nbytes(s, min(CANDIDATES), settings.codec.rotate_output) for s in shapes)
    if (floor + sum(b for _, b in fixed.values())) * 8 > numel * settings.target_bpw:  # before any measuring
        raise _below_floor(settings, floor, fixed, numel, CANDIDATES)
    if measure is not None:
        measured = measure(free_names)
        free = module_weights(model, free_names)
        cost_fn = lambda key, w, h: measured[key]  # noqa: E731
    else:
        free = module_weights(model, free_names, hessians, get)
    chosen, _ = allocate(free, settings, fixed, cost_fn=cost_fn)
    return {n: chosen.get(n, b) for n, b in plan.items()}


# MSE per weight of the codec on unit Gaussian data at L = 16 (docs/CODEC.md)
GAUSSIAN_MSE = {2: 0.0683, 3: 0.0177, 4: 0.0045}


def target_overrides(spec, settings: QuantSettings) -> list:
    """`settings.overrides` plus one exact-name override per module of CONFIG `spec` for
    `settings.target_bpw`, chosen without weights (`ccq plan`): every weight counts the same
    (Gaussian MSE per weight), so this gives the size a `--target-bpw` run will have, not which
    modules its measured costs will favour."""
    from ..models.policy import quant_plan
    from ..models.skeleton import build_skeleton
    from ..plan import configs

    config, cls, _ = configs.resolve(spec)
    model = build_skeleton(cls, config)
    plan = quant_plan(model, settings.bits, settings.overrides)

    def cost(m, w, h):
        return {b: GAUSSIAN_MSE[b] * w.numel() for b in CANDIDATES}

    chosen = allocate_model(model, plan, settings, cost_fn=cost)
    return list(settings.overrides) + [(n, b) for n, b in chosen.items() if b != plan[n]]
