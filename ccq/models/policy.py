"""Which modules are quantized at which bit width: the one place that decides it.

Works on a model built on the meta device (no weights needed), so the quantizer, the
loader, the transformers integration and footprint planning all agree.

Defaults: every routed-expert module (transformers' fused [E, out, in] layout) and every
nn.Linear at `bits`, except the output head (lm_head / output embeddings) and routers
(linears named `gate` or `router`) and patch embeddings (`*patch_embed*`: an embedding
whose forward reads `proj.weight.dtype`, and tiny). Embeddings, norms, routers and biases
are never quantized. User overrides are `(pattern, bits)` pairs, fnmatch patterns on the module
name, bits in 2..4 or 16 (= keep 16-bit); the last matching pattern wins.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from ..codec.config import BITS, check_bits
from .arch import group_patterns
from .quant_modules import QuantExperts, QuantLinear, experts_kind
from .settings import KEEP

ROUTER_NAMES = ("gate", "router")
NEVER = ("*patch_embed*",)
GROUPS = group_patterns() + (  # first match wins: the vision tower's own attention and MLPs count as vision
    ("vision_tower", ("*vision_tower.*", "*vision_model.*", "*visual.*")),
    ("routed_experts", ("*.experts",)),
    ("shared_experts", ("*.shared_experts.*",)),
    ("attention", ("*.self_attn.*", "*.attention.*", "*.attn.*")),
    ("dense_mlp", ("*.mlp.*",)),
)


def parse_override(text: str) -> tuple[str, int]:
    """'PATTERN=BITS' -> (pattern, bits); bits 2, 3, 4 or 16."""
    pattern, sep, bits = text.rpartition("=")
    if not sep or not pattern:
        raise ValueError(f"module override {text!r} must look like PATTERN=BITS (e.g. '*.vision_tower.*=16')")
    try:
        b = int(bits)
    except ValueError:
        raise ValueError(f"module override {text!r}: bits {bits!r} is not an integer") from None
    if b not in BITS + (KEEP,):
        raise ValueError(f"module override {text!r}: bits must be 2, 3, 4 or 16, got {b}")
    return pattern, b


def module_group(name: str) -> str:
    """The report/inspect group of a module name (routed_experts, attention, vision_tower, ...)."""
    for group, patterns in GROUPS:
        if any(fnmatchcase(name, p) for p in patterns):
            return group
    return "other"


def quantizable(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of every module the policy may quantize (before overrides)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, QuantExperts)) or experts_kind(mod) is not None:
            found[name] = mod
        elif isinstance(mod, nn.Linear) and mod is not head and name.rsplit(".", 1)[-1] not in ROUTER_NAMES \
                and not any(fnmatchcase(name, p) for p in NEVER):
            found[name] = mod
    return found


def quant_plan(model: nn.Module, bits: int, overrides: tuple[tuple[str, int], ...] | list = ()) -> dict[str, int]:
    """{module name: bits} for every module to quantize, in model order (16-bit ones left out)."""
    check_bits(bits)
    plan = {}
    for name in quantizable(model):
        b = bits
        for pattern, ob in overrides:
            if fnmatchcase(name, pattern):
                b = ob
        if b != KEEP:
            plan[name] = b
    return plan


def packed_names(model: nn.Module, plan: dict[str, int]) -> dict[str, tuple[tuple[int, ...], int]]:
    """{weight prefix X: (dense shape, bits)} for every packed tensor the plan produces."""
    mods = dict(model.named_modules())
    out = {}
    for name, b in plan.items():
        m = mods[name]
        if isinstance(m, QuantExperts):
            out[f"{name}.gate_up_proj"] = (m.gate_up_proj.dense_shape, b)
            out[f"{name}.down_proj"] = (m.down_proj.dense_shape, b)
        elif isinstance(m, QuantLinear):
            out[name] = ((m.out_features, m.in_features), b)
        elif isinstance(m, nn.Linear):
            out[name] = (tuple(m.weight.shape), b)
        else:
            for wname, w in experts_kind(m).dense(m).items():
                out[f"{name}.{wname}"] = (tuple(w.shape), b)
    return out


def replace_with_quant_modules(model: nn.Module, plan: dict[str, int], rotate_output: bool = False) -> None:
    """Swap every planned module for an empty (uninitialised) quantized twin, in place."""
    for name, b in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        mod = getattr(parent, child)
        if isinstance(mod, (QuantLinear, QuantExperts)):
            continue
        new = QuantLinear.like(mod, b, rotate_output) if isinstance(mod, nn.Linear) else \
            experts_kind(mod).like(mod, b, rotate_output)
        setattr(parent, child, new)
