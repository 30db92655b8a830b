"""Test data for the pipeline tests: calibration words and Baidu's remote-code config flavour.

The tiny models themselves come from `ccq.tiny`."""

from __future__ import annotations

import json

WORDS = ("the a chart bar value shows year sales rose fell by percent in of and to is was what how many "
         "red blue green total highest lowest").split()


def remote_config(native: dict) -> dict:
    """The same tiny model described by a Baidu remote-code (`ernie4_5_moe_vl`) config.json."""
    t, v = native["text_config"], native["vision_config"]
    return {
        "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"], "model_type": "ernie4_5_moe_vl",
        "auto_map": {"AutoConfig": "configuration_ernie_45t_vl.Ernie4_5_VLMoEConfig"},
        "hidden_size": t["hidden_size"], "intermediate_size": t["intermediate_size"], "hidden_act": "silu",
        "num_hidden_layers": t["num_hidden_layers"], "num_attention_heads": t["num_attention_heads"],
        "num_key_value_heads": t["num_key_value_heads"], "vocab_size": t["vocab_size"],
        "max_position_embeddings": t["max_position_embeddings"], "rms_norm_eps": t["rms_norm_eps"],
        "rope_theta": 500000, "freq_allocation": t["rope_parameters"]["mrope_section"][2], "rope_3d": True,
        "tie_word_embeddings": True, "use_bias": False,
        "moe_num_experts": [t["moe_num_experts"]] * 2, "moe_intermediate_size": t["moe_intermediate_size"],
        "moe_k": t["moe_k"], "moe_num_shared_experts": t["moe_num_shared_experts"],
        "moe_layer_start_index": 1, "moe_layer_end_index": t["num_hidden_layers"] - 1, "moe_layer_interval": 1,
        "pixel_hidden_size": v["hidden_size"], "spatial_conv_size": 2, "temporal_conv_size": 2,
        "im_patch_id": native["image_token_id"], "torch_dtype": "bfloat16",
        "vision_config": {"depth": v["depth"], "embed_dim": v["hidden_size"], "hidden_size": v["hidden_size"],
                          "mlp_ratio": v["intermediate_size"] / v["hidden_size"], "num_heads": v["num_heads"],
                          "patch_size": v["patch_size"], "in_channels": 3, "spatial_merge_size": 2,
                          "hidden_act": "quick_gelu", "model_type": "DFNRope_vision_transformer"},
        **{k: native[k] for k in ("image_start_token_id", "image_end_token_id", "video_start_token_id",
                                  "video_end_token_id")},
    }


def write_remote_flavour(src, dst):
    """Copy a tiny model folder, replacing config.json with the remote-code flavour."""
    import shutil

    shutil.copytree(src, dst)
    native = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(remote_config(native), indent=2))
    return dst


def files(d) -> dict[str, bytes]:
    """The bytes of every file of a packed folder but the report (which holds timings)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "quantization_report.json"}
