"""The model's structure without its weights: the meta-device skeleton, its decoder layers and
units, tied weights, and the exact list of tensors its packed checkpoint holds.

The quantizer streams the skeleton unit by unit; `ccq plan` sums the checkpoint tensors and
`ccq synth` fills them with random values: all go through the same policy (`quant_plan`), the
same quantized modules (`replace_with_quant_modules`, whose buffers come from
`codec.packed_layout`) and the same tied-weight rule as the writer.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .policy import quant_plan, replace_with_quant_modules
from .quant_modules import PackedWeight


def build_skeleton(cls, config) -> nn.Module:
    """The model with every parameter on the meta device (buffers stay real)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls._from_config(config)
    return model.eval()


def tied_targets(model: nn.Module) -> dict[str, str]:
    """{tied parameter: the parameter it shares} (e.g. lm_head.weight -> embed_tokens.weight)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return dict(tied) if getattr(model.config, "tie_word_embeddings", True) else {}


def retie(model: nn.Module, tied: dict[str, str]):
    """Point every tied parameter at its source again (after materialising the source)."""
    for target, source in tied.items():
        parent, _, leaf = target.rpartition(".")
        setattr(model.get_submodule(parent), leaf, model.get_parameter(source))


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's layer list: the biggest ModuleList named `layers`, `h` or `layer` (BERT-style
    encoders)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "layer") and len(mod):
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[2]:
                best = (name, mod, size)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no decoder layer list found (unknown architecture)")
    return best[0], best[1]


def unit_params(model: nn.Module, layers_name: str, num_layers: int) -> list[list[str]]:
    """Parameter names per unit: [outside the layers, layer 0, layer 1, ...]."""
    units = [[] for _ in range(num_layers + 1)]
    prefix = layers_name + "."
    tied = tied_targets(model)
    for name, _ in model.named_parameters():
        if name in tied:
            continue
        if name.startswith(prefix):
            units[int(name[len(prefix):].split(".", 1)[0]) + 1].append(name)
        else:
            units[0].append(name)
    return units


def persistent_tensors(module: nn.Module, prefix: str, skip: str | None = None) -> dict[str, torch.Tensor]:
    """{checkpoint name: tensor} of the materialised parameters and persistent buffers under
    `module` (named from `prefix`, leaving out the submodule `skip`); tied weights once."""
    out = {}
    for mname, mod in module.named_modules(prefix=prefix):
        if skip is not None and (mname == skip or mname.startswith(skip + ".")):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.device.type != "meta":  # an untied-but-unread param is tied to one already stored
                out[f"{mname}.{pname}" if mname else pname] = p
        for bname, b in mod.named_buffers(recurse=False):
            if b is not None and b.device.type != "meta" and bname not in mod._non_persistent_buffers_set:
                out[f"{mname}.{bname}" if mname else bname] = b
    seen, dedup = set(), {}
    for k, v in out.items():  # tied weights are written once, under their first name
        key = (v.data_ptr(), v.device, tuple(v.shape))
        if key not in seen:
            seen.add(key)
            dedup[k] = v
    return dedup


def quantized_skeleton(config, cls, bits: int | None, overrides=()) -> tuple[nn.Module, dict[str, int]]:
    """(meta model with empty quantized modules, plan); bits None keeps everything 16-bit."""
    model = build_skeleton(cls, config)
    plan = quant_plan(model, bits, overrides) if bits is not None else {}
    replace_with_quant_modules(model, plan)
    return model, plan


def fp32_names(model: nn.Module) -> set[str]:
    """Parameters transformers keeps in float32 whatever the model dtype (e.g. MoE routers)."""
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or getattr(model, "_keep_in_fp32_modules", None) or ()
    pats = [re.compile(rf"(^|\.){re.escape(k)}($|\.)") for k in keep]
    return {n for n, _ in model.named_parameters() if any(p.search(n) for p in pats)}


def packed_buffer_names(model: nn.Module) -> set[str]:
    """Names of the trellis/scales/signs/meta buffers of every quantized module."""
    names = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, PackedWeight):
            names |= {f"{mname}.{b}" for b, t in mod.named_buffers(recurse=False) if t is not None}
    return names


def checkpoint_tensors(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of every tensor the packed checkpoint stores, in model order.

    Packed fields keep their own dtypes, floating parameters are `dtype` (float32 where
    transformers insists), buffers keep theirs; tied copies are stored once.
    """
    tied = tied_targets(model)
    packed, fp32 = packed_buffer_names(model), fp32_names(model)
    params = {n for n, _ in model.named_parameters()}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name in tied:
            continue
        dt = t.dtype
        if name in params and name not in packed and t.is_floating_point():
            dt = torch.float32 if name in fp32 else dtype
        out[name] = (tuple(t.shape), dt)
    return out


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()
