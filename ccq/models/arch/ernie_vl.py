"""ERNIE-4.5-VL (`ernie4_5_vl_moe`, and Baidu's remote-code `ernie4_5_moe_vl` config flavour).

Baidu's checkpoints (and transformers' own `save_pretrained`, which reverts to them) store one
tensor per expert, text experts first (`mlp.experts.{e}.*`, e >= n: vision), transposed routers
`mlp.gate.weight` / `mlp.gate.weight_1`, one `moe_statics.e_score_correction_bias` [2, n] and
`model.vision_model.*`: transformers' conversion mapping for `ernie4_5_vl_moe` rebuilds the native
tensors from them (`CheckpointNames`). The adapter converts the remote config flavour, lays out image
tokens for calibration as the ERNIE processor does, and names the resampler group.
"""

from __future__ import annotations

import torch

from .base import TRANSIENT_KEYS, Adapter

NATIVE = "ernie4_5_vl_moe"
REMOTE = "ernie4_5_moe_vl"
SPECIAL_TOKENS = ("image_token", "image_start_token", "image_end_token", "video_token", "video_start_token",
                  "video_end_token")


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


def remote_config_dict(native: dict) -> dict:
    """Baidu's flat `ernie4_5_moe_vl` config dict of the same model (the inverse of `native_config_dict`).

    vLLM's ERNIE-4.5-VL model code reads this layout (`moe_num_experts` as a [text, vision] pair,
    `im_patch_id`, `pixel_hidden_size`, ...), while ccq writes the native one. MoE layers must be one
    contiguous run up to the last layer (`moe_layer_start_index`..`moe_layer_end_index`, interval 1).
    """
    if native.get("model_type") != NATIVE:
        raise ValueError(f"not a native ERNIE-4.5-VL config (model_type {native.get('model_type')!r})")
    t, v = native.get("text_config") or {}, native.get("vision_config") or {}
    layers = t["num_hidden_layers"]
    types = t.get("mlp_layer_types") or ["dense"] + ["sparse"] * (layers - 1)
    sparse = [i for i, kind in enumerate(types) if kind == "sparse"]
    if not sparse or sparse != list(range(sparse[0], layers)):
        raise ValueError(f"config.json: mlp_layer_types {types} is not one run of MoE layers up to the last; "
                         "Baidu's config layout cannot describe it")
    heads = t["num_attention_heads"]
    head_dim = t["hidden_size"] // heads
    rope = t.get("rope_parameters") or {}
    h, w, fa = rope.get("mrope_section") or [(head_dim // 2 - 20) // 2] * 2 + [20]
    if h != w or h != (head_dim // 2 - fa) // 2:
        raise ValueError(f"config.json: mrope_section {[h, w, fa]} is not Baidu's [(d/2 - f)/2, (d/2 - f)/2, f] "
                         f"for head dim {head_dim}")
    n_exp = t.get("moe_num_experts", 64)
    embed = v.get("hidden_size", 1280)
    out = {"architectures": ["Ernie4_5_VLMoeForConditionalGeneration"], "model_type": REMOTE,
           **{k: t[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
                                "rms_norm_eps", "use_bias", "moe_intermediate_size", "moe_k", "moe_num_shared_experts",
                                "pad_token_id", "bos_token_id", "eos_token_id") if k in t},
           "head_dim": head_dim, "rope_theta": float(rope.get("rope_theta", 500000.0)), "freq_allocation": fa,
           "rope_3d": True, "moe_num_experts": [n_exp, n_exp], "moe_layer_start_index": [sparse[0]] * 2,
           "moe_layer_end_index": [layers - 1] * 2, "moe_layer_interval": 1,
           "tie_word_embeddings": native.get("tie_word_embeddings", t.get("tie_word_embeddings", True)),
           "pixel_hidden_size": embed, "spatial_conv_size": v.get("spatial_merge_size", 2),
           "temporal_conv_size": v.get("temporal_merge_size", 2), "use_temporal_conv": True,
           "vision_config": {"depth": v.get("depth", 32), "embed_dim": embed, "hidden_size": embed,
                             "mlp_ratio": v.get("intermediate_size", 4 * embed) / embed,
                             "num_heads": v.get("num_heads", 16), "in_channels": v.get("in_channels", 3),
                             "patch_size": v.get("patch_size", 14),
                             "spatial_merge_size": v.get("spatial_merge_size", 2),
                             "hidden_act": v.get("hidden_act", "quick_gelu")}}
    if "image_token_id" in native:
        out["im_patch_id"] = native["image_token_id"]
    for k in ("image_start_token_id", "image_end_token_id", "video_start_token_id", "video_end_token_id",
              "video_token_id", "dtype", "quantization_config"):
        if k in native:
            out[k] = native[k]
    return out


class ErnieVL(Adapter):
    name = "ernie4_5_vl"
    model_types = (NATIVE, REMOTE)
    group_patterns = (("resampler", ("*resampler_model.*",)),)
    takes_images = True

    def config_dict(self, raw: dict) -> dict:
        return native_config_dict(raw)

    def build_config(self, raw: dict, where: str = "config.json"):
        from transformers import Ernie4_5_VLMoeConfig

        d = {k: v for k, v in native_config_dict(raw).items() if k not in TRANSIENT_KEYS}
        try:
            return Ernie4_5_VLMoeConfig(**d)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{where} is not a valid ERNIE-4.5-VL config: {e}") from None

    def model_class(self, config, where: str = "config.json"):
        from transformers import Ernie4_5_VLMoeForConditionalGeneration

        return Ernie4_5_VLMoeForConditionalGeneration

    def image_sample(self, pixels: dict, text_ids: torch.Tensor, config) -> dict:
        """Image start, one placeholder per merged patch, image end, then the text, with
        `mm_token_type_ids` / `moe_mm_token_type_ids` set as the ERNIE processor sets them (so image
        tokens reach the vision experts); needs only the image processor's output, not the full
        processor (whose video part needs torchvision)."""
        grid = pixels["image_grid_thw"]
        n = int(grid.prod()) // (config.vision_config.spatial_merge_size ** 2)
        ids = torch.cat([torch.tensor([config.image_start_token_id] + [config.image_token_id] * n +
                                      [config.image_end_token_id]), text_ids])[None]
        mm = (ids == config.image_token_id).long()
        moe = mm | (ids == config.image_start_token_id).long() | (ids == config.image_end_token_id).long()
        return {"input_ids": ids, "pixel_values": pixels["pixel_values"], "image_grid_thw": grid,
                "mm_token_type_ids": mm, "moe_mm_token_type_ids": moe}

    def tiny_config(self, tokenizer, layers: int = 2, patch_size: int = 14, initializer_range: float = 0.2,
                    **overrides):
        """Layer 0 dense, the others MoE (4 text + 4 vision experts, top-2, one shared), a 1-block
        vision tower; token ids from the tokenizer's named ERNIE tokens."""
        from transformers import Ernie4_5_VLMoeConfig

        from .base import text_ids

        ids = text_ids(tokenizer)
        return Ernie4_5_VLMoeConfig(
            text_config=dict(
                hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [3, 3, 2]},
                mlp_layer_types=["dense"] + ["sparse"] * (layers - 1), moe_intermediate_size=[32, 32], moe_k=2,
                moe_num_experts=4, moe_num_shared_experts=1, initializer_range=initializer_range, **ids),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch_size,
                               spatial_merge_size=2),
            **{f"{t}_id": tokenizer.convert_tokens_to_ids(getattr(tokenizer, t)) for t in SPECIAL_TOKENS},
            **overrides)


ADAPTER = ErnieVL()
