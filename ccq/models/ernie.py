"""ERNIE-4.5-VL adapter: both config.json flavours, Baidu's per-expert tensor names, and the
transformers (native `ernie4_5_vl_moe`) module layout.

Baidu's checkpoints (and transformers' own `save_pretrained`, which reverts to them) store
`model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.weight` with E < n text experts and
E >= n vision experts, transposed routers `mlp.gate.weight` / `mlp.gate.weight_1`,
`mlp.moe_statics.e_score_correction_bias` [2, n], `model.vision_model.*` and
`resampler_model.spatial_linear.{0,2,3}`. `source_tensor` rebuilds any native parameter
from those names one at a time (the same mapping as transformers' conversion_mapping for
`ernie4_5_vl_moe`), so a decoder layer can be materialised without loading the rest.
"""

from __future__ import annotations

import re

import torch

NATIVE = "ernie4_5_vl_moe"
REMOTE = "ernie4_5_moe_vl"
LAYER_PREFIX = "model.language_model.layers."

_RENAMES = (  # native -> Baidu, applied in order
    ("model.language_model.", "model."),
    ("model.vision_tower.", "model.vision_model."),
    ("spatial_linear.fc1.", "spatial_linear.0."),
    ("spatial_linear.fc2.", "spatial_linear.2."),
    ("spatial_linear.ln.", "spatial_linear.3."),
    ("temporal_linear.fc1.", "temporal_linear.0."),
    ("temporal_linear.fc2.", "temporal_linear.2."),
    ("temporal_linear.ln.", "temporal_linear.3."),
)
_MOE = re.compile(r"^(?P<pre>.*\.mlp\.)(?P<mod>text|vision)_moe\.(?P<rest>.+)$")


def is_ernie_vl(config: dict) -> bool:
    return config.get("model_type") in (NATIVE, REMOTE)


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) else v


def native_config_dict(raw: dict) -> dict:
    """A config dict of model_type `ernie4_5_vl_moe`, from either flavour of config.json."""
    if raw.get("model_type") == NATIVE:
        return raw
    if raw.get("model_type") != REMOTE:
        raise ValueError(f"not an ERNIE-4.5-VL config (model_type {raw.get('model_type')!r})")
    n_exp = raw.get("moe_num_experts", 64)
    if isinstance(n_exp, (list, tuple)) and len(set(n_exp)) != 1:
        raise ValueError(f"config.json: moe_num_experts {n_exp} differ between text and vision; "
                         "transformers' ERNIE-4.5-VL needs equal counts")
    layers = raw["num_hidden_layers"]
    start = min(raw.get("moe_layer_start_index", 1)) if isinstance(raw.get("moe_layer_start_index"), list) \
        else raw.get("moe_layer_start_index", 1)
    end = raw.get("moe_layer_end_index", layers - 1)
    end = max(end) if isinstance(end, list) else end
    end = layers - 1 if end is None or end < 0 else end
    interval = raw.get("moe_layer_interval", 1)
    types = ["sparse" if start <= i <= end and (i - start) % interval == 0 else "dense" for i in range(layers)]
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    fa = raw.get("freq_allocation", 20)
    half = (head_dim // 2 - fa) // 2
    text = {k: raw[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
                                "rms_norm_eps", "tie_word_embeddings", "use_bias", "moe_intermediate_size", "moe_k",
                                "moe_num_shared_experts") if k in raw}
    text.update(moe_num_experts=_first(n_exp), mlp_layer_types=types,
                rope_parameters={"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 500000.0)),
                                 "mrope_section": [half, half, fa]})
    v = raw.get("vision_config", {})
    embed = v.get("embed_dim", v.get("hidden_size", 1280))
    vision = {"depth": v.get("depth", 32), "hidden_size": embed,
              "intermediate_size": int(embed * v.get("mlp_ratio", 4)), "num_heads": v.get("num_heads", 16),
              "in_channels": v.get("in_channels", v.get("in_chans", 3)), "patch_size": v.get("patch_size", 14),
              "spatial_merge_size": v.get("spatial_merge_size", raw.get("spatial_conv_size", 2)),
              "temporal_merge_size": raw.get("temporal_conv_size", 2), "hidden_act": v.get("hidden_act", "quick_gelu")}
    out = {"model_type": NATIVE, "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"],
           "text_config": text, "vision_config": vision,
           "tie_word_embeddings": raw.get("tie_word_embeddings", True)}
    if "im_patch_id" in raw:
        out["image_token_id"] = raw["im_patch_id"]
    for k in ("image_start_token_id", "image_end_token_id", "video_start_token_id", "video_end_token_id",
              "video_token_id", "torch_dtype", "dtype"):
        if k in raw:
            out[k] = raw[k]
    return out


def build_config(raw: dict):
    """transformers config object for either flavour."""
    from transformers import Ernie4_5_VLMoeConfig

    d = {k: v for k, v in native_config_dict(raw).items() if k not in ("model_type", "transformers_version")}
    try:
        return Ernie4_5_VLMoeConfig(**d)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"config.json is not a valid ERNIE-4.5-VL config: {e}") from None


def baidu_name(name: str) -> str:
    for a, b in _RENAMES:
        name = name.replace(a, b)
    return name


def source_tensor(src, name: str, num_experts: int) -> torch.Tensor:
    """The native parameter `name`, read from `src` under native or Baidu names."""
    if name in src:
        return src.get(name)
    m = _MOE.match(name)
    if m:
        pre, vision, rest = baidu_name(m["pre"]), m["mod"] == "vision", m["rest"]
        experts = range(num_experts, 2 * num_experts) if vision else range(num_experts)
        if rest == "gate.weight":
            return src.get(pre + ("gate.weight_1" if vision else "gate.weight")).T.contiguous()
        if rest == "gate.moe_statics.e_score_correction_bias":
            bias = src.get(pre + "moe_statics.e_score_correction_bias")
            return bias[1:2].clone() if vision else bias[0:1].clone()
        if rest == "experts.gate_up_proj":
            return torch.stack([torch.cat([src.get(f"{pre}experts.{e}.gate_proj.weight"),
                                           src.get(f"{pre}experts.{e}.up_proj.weight")]) for e in experts])
        if rest == "experts.down_proj":
            return torch.stack([src.get(f"{pre}experts.{e}.down_proj.weight") for e in experts])
    return src.get(baidu_name(name))


def layer_index(name: str) -> int | None:
    """Decoder layer number of a parameter name, None outside the decoder layers."""
    if name.startswith(LAYER_PREFIX):
        return int(name[len(LAYER_PREFIX):].split(".", 1)[0])
    return None
