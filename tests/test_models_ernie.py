"""ERNIE-4.5-VL adapter: checkpoint names, config flavours, the quantization policy, sizes."""

import json

import pytest
import torch
from transformers import Ernie4_5_VLMoeForConditionalGeneration

from ccq import quantize_tensor
from ccq.models.skeleton import decoder_layers, tied_targets, unit_params
from ccq.pipeline.model_dir import open_model_dir
from ccq.codec import packed_layout, packed_nbytes
from ccq.format.source import SourceCheckpoint
from ccq.models.policy import module_group, parse_override, quant_plan

from ccq.tiny import build_tiny_ernie_vl
from pipeline_helpers import write_remote_flavour


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return build_tiny_ernie_vl(tmp_path_factory.mktemp("sharded") / "m", layers=3, max_shard_size="100KB")


def test_save_pretrained_writes_baidu_per_expert_names(sharded):
    src = SourceCheckpoint(sharded)
    names = set(src.keys())
    assert (sharded / "model.safetensors.index.json").exists() and len(set(src.weight_map.values())) > 1
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names  # 4 text + 4 vision experts
    assert "model.layers.1.mlp.gate.weight_1" in names and src.shape("model.layers.1.mlp.gate.weight") == (64, 4)
    assert not any("text_moe" in n for n in names)


@pytest.mark.parametrize("flavour", ["native", "remote"])
def test_every_native_tensor_resolves_from_the_shards(sharded, tmp_path, flavour):
    model_dir = sharded if flavour == "native" else write_remote_flavour(sharded, tmp_path / "remote")
    ref = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(str(sharded)).eval()
    src, arch, skel, ckpt = open_model_dir(model_dir)
    layers_name, layers = decoder_layers(skel)
    assert layers_name == "model.language_model.layers" and len(layers) == 3
    units = unit_params(skel, layers_name, len(layers))
    ref_state = ref.state_dict()
    n = 0
    for names in units:
        for name in names:
            got = ckpt.get(name)
            assert torch.equal(got, ref_state[name].to(got.dtype)), name
            n += 1
    assert n == len(ref_state) - 1  # lm_head is tied to the embeddings


def test_remote_config_maps_to_the_same_architecture(tiny_ernie, tmp_path):
    from ccq.models.arch import ernie_vl

    build_config = ernie_vl.ADAPTER.build_config
    native = json.loads((tiny_ernie / "config.json").read_text())
    remote = json.loads(write_remote_flavour(tiny_ernie, tmp_path / "r").joinpath("config.json").read_text())
    a, b = build_config(native), build_config(remote)
    for key in ("hidden_size", "num_hidden_layers", "moe_num_experts", "moe_intermediate_size", "mlp_layer_types",
                "num_key_value_heads", "moe_k"):
        assert getattr(a.text_config, key) == getattr(b.text_config, key), key
    assert a.text_config.rope_parameters["mrope_section"] == b.text_config.rope_parameters["mrope_section"]
    for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size"):
        assert getattr(a.vision_config, key) == getattr(b.vision_config, key), key
    assert a.image_token_id == b.image_token_id


def test_baidu_layout_round_trip_and_refusals(tiny_ernie):
    """`remote_config_dict` (what vLLM's ERNIE-4.5-VL code reads) converts back to the same native config."""
    from ccq.models.arch.ernie_vl import native_config_dict, remote_config_dict

    native = json.loads((tiny_ernie / "config.json").read_text())
    remote = remote_config_dict(native)
    assert remote["moe_num_experts"] == [4, 4] and remote["moe_layer_start_index"] == [1, 1]
    assert remote["im_patch_id"] == native["image_token_id"]
    back = native_config_dict(remote)
    for key in ("hidden_size", "num_hidden_layers", "moe_num_experts", "moe_intermediate_size", "mlp_layer_types",
                "num_key_value_heads", "moe_k", "moe_num_shared_experts"):
        assert back["text_config"][key] == native["text_config"][key], key
    assert back["text_config"]["rope_parameters"]["mrope_section"] == \
        native["text_config"]["rope_parameters"]["mrope_section"]
    for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "spatial_merge_size"):
        assert back["vision_config"][key] == native["vision_config"][key], key
    gap = json.loads(json.dumps(native))
    gap["text_config"]["mlp_layer_types"] = ["dense", "sparse", "dense"]
    with pytest.raises(ValueError, match=r"mlp_layer_types \['dense', 'sparse', 'dense'\] is not one run"):
        remote_config_dict(gap)
    with pytest.raises(ValueError, match="not a native ERNIE-4.5-VL config"):
        remote_config_dict(remote)


def test_default_policy_and_overrides(tiny_ernie):
    _, _, skel, _ = open_model_dir(tiny_ernie)
    plan = quant_plan(skel, 2)
    assert plan["model.language_model.layers.1.mlp.text_moe.experts"] == 2
    assert plan["model.language_model.layers.1.mlp.vision_moe.experts"] == 2
    for kept in ("lm_head", "model.language_model.layers.1.mlp.text_moe.gate", "model.language_model.embed_tokens"):
        assert kept not in plan
    assert module_group("model.vision_tower.blocks.0.attn.qkv") == "vision_tower"
    assert module_group("model.language_model.layers.0.mlp.up_proj") == "dense_mlp"
    groups = {module_group(n) for n in plan}
    assert groups == {"routed_experts", "shared_experts", "attention", "vision_tower", "resampler", "dense_mlp"}
    over = [parse_override("*vision_tower.*=16"), parse_override("*.self_attn.*=4")]
    plan2 = quant_plan(skel, 2, over)
    assert not any("vision_tower" in n for n in plan2)
    assert plan2["model.language_model.layers.2.self_attn.q_proj"] == 4
    with pytest.raises(ValueError, match="bits must be 2, 3, 4 or 16"):
        parse_override("*=5")


@pytest.mark.parametrize("shape,bits,rot", [((40, 24), 2, False), ((3, 48, 32), 3, True), ((16, 100), 4, False)])
def test_packed_size_without_quantizing_matches_the_codec(shape, bits, rot):
    w = torch.randn(shape)
    qt = quantize_tensor(w, bits, L=8, rotate_output=rot)
    layout = packed_layout(shape, bits, rot)
    assert {k: (tuple(v.shape), v.dtype) for k, v in qt.state_dict().items()} == layout
    assert packed_nbytes(shape, bits, rot) == qt.nbytes


def test_footprint_from_the_config_alone_matches_the_written_checkpoint(tmp_path):
    """quant_plan + packed_nbytes on a meta-device model predict the packed folder's tensor bytes."""
    from ccq.pipeline import quantize_model_dir
    from ccq.models.policy import packed_names

    src = build_tiny_ernie_vl(tmp_path / "m")
    over = [("*.experts", 3), ("*vision_tower.*", 16)]
    out = tmp_path / "q"
    quantize_model_dir(src, out, 2, overrides=over, L=8, progress=False)
    _, _, skel, _ = open_model_dir(src)
    plan = quant_plan(skel, 2, over)
    packed = packed_names(skel, plan)
    predicted = sum(packed_nbytes(shape, b) for shape, b in packed.values())
    mods, tied = set(plan), tied_targets(skel)
    for name, p in skel.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if name in packed or name in tied or (owner in mods and name.endswith(".weight")):
            continue
        predicted += p.numel() * 2  # bf16
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == predicted
    assert any(b == 3 for _, b in packed.values()) and not any("vision_tower" in k for k in packed)
