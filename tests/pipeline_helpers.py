"""Tiny models and datasets for the pipeline tests, built on the fly (nothing downloaded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

WORDS = ("the a chart bar value shows year sales rose fell by percent in of and to is was what how many "
         "red blue green total highest lowest").split()
IMAGE_TOKENS = dict(image_token_id=250, image_start_token_id=251, image_end_token_id=252,
                    video_token_id=253, video_start_token_id=254, video_end_token_id=255)


def tiny_ernie_config(layers: int = 3):
    from transformers import Ernie4_5_VLMoeConfig

    return Ernie4_5_VLMoeConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=[32, 48], moe_k=2,
                         moe_num_experts=4, moe_num_shared_experts=1, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4),
        **IMAGE_TOKENS)


def save_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(path))


def save_image_processor(path):
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    Ernie4_5_VLMoeImageProcessorPil(patch_size=4, merge_size=2,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}).save_pretrained(str(path))


def build_tiny_ernie(path, layers: int = 3, seed: int = 0, max_shard_size=None):
    """A random bf16 ERNIE-4.5-VL saved by transformers (per-expert Baidu names) + tokenizer files."""
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    torch.manual_seed(seed)
    model = Ernie4_5_VLMoeForConditionalGeneration(tiny_ernie_config(layers)).to(torch.bfloat16).eval()
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kw)
    save_tokenizer(path)
    save_image_processor(path)
    return path


def image_inputs(path, text="what is the highest bar"):
    """An image+text batch for the tiny ERNIE built like the calibration sampler builds it."""
    from PIL import Image
    from transformers import AutoTokenizer

    from ccq.calibration.data import _image_processor, _image_sample

    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((30, 40, 3)) * 255).astype("uint8"))
    return _image_sample(img, text, AutoTokenizer.from_pretrained(str(path)), _image_processor(path),
                         tiny_ernie_config(), 64)


@pytest.fixture(scope="session")
def tiny_ernie(tmp_path_factory):
    return build_tiny_ernie(tmp_path_factory.mktemp("ernie") / "model")


@pytest.fixture(scope="session")
def calib_parquet(tmp_path_factory):
    """Text rows and image+text rows (PIL images) as a parquet file."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(1)
    rows = {"text": [], "image": []}
    for i in range(6):
        rows["text"].append(" ".join(rng.choice(WORDS, 40)))
        rows["image"].append(None)
    for i in range(2):
        rows["text"].append("what is the value of the red bar")
        rows["image"].append(Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")))
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"text": datasets.Value("string"), "image": datasets.Image()}))
    path = tmp_path_factory.mktemp("calib") / "calib.parquet"
    ds.to_parquet(str(path))
    return path


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
        "rope_theta": 500000, "freq_allocation": 4, "rope_3d": True, "tie_word_embeddings": True, "use_bias": False,
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
