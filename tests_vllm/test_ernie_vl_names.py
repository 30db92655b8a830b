"""ERNIE-4.5-VL: ccq's native checkpoint names as vLLM's ERNIE-4.5-VL model reads them, and what the
plugin refuses (no engine: the names, module map and refusals alone)."""

from types import SimpleNamespace
from unittest import mock

import pytest
from vllm.config.multimodal import MultiModalConfig
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import QKVParallelLinear, UnquantizedLinearMethod
from vllm.model_executor.models.ernie45_vl import Ernie4_5_VLMoeForConditionalGeneration

from ccq.serving.vllm_plugin import CcqConfig

L1 = "model.language_model.layers.1"


def _config(modules=(f"{L1}.mlp.text_moe.experts", f"{L1}.mlp.vision_moe.experts", f"{L1}.self_attn.q_proj",
                     "model.vision_tower.blocks.0.attn.qkv")):
    qc = CcqConfig({"quant_method": "ccq", "format_version": 1, "bits": 2, "hadamard_block": 512,
                    "modules": {m: 2 for m in modules}})
    qc.maybe_update_config("m", SimpleNamespace(architectures=["Ernie4_5_VLMoeForConditionalGeneration"]))
    return qc


def test_checkpoint_names_reach_the_vl_loader():
    """Renamed by the plugin, then by the model's own mapper, as vLLM's AutoWeightsLoader does."""
    mapper = Ernie4_5_VLMoeForConditionalGeneration.hf_to_vllm_mapper | _config().get_checkpoint_weight_mapper()
    names = {
        f"{L1}.mlp.text_moe.experts.gate_up_proj.trellis": "mlp.text_experts.routed_experts.w13.trellis",
        f"{L1}.mlp.vision_moe.experts.down_proj.meta": "mlp.vision_experts.routed_experts.w2.meta",
        f"{L1}.mlp.text_moe.gate.weight": "mlp.text_experts_gate.weight",
        f"{L1}.mlp.vision_moe.gate.weight": "mlp.vision_experts_gate.weight",
        f"{L1}.mlp.shared_experts.up_proj.scales": "mlp.shared_experts.up_proj.scales",  # the loader stacks it
        f"{L1}.self_attn.k_proj.signs_in": "self_attn.k_proj.signs_in",
    }
    for ckpt, vllm in names.items():
        assert mapper.map_name(ckpt) == f"language_model.model.layers.1.{vllm}", ckpt
        assert "mlp.experts" not in vllm  # else the loader parses a Baidu expert index out of it
        if ".routed_experts." in vllm:  # else the loader takes it for a gate/up shard
            assert "up_proj" not in vllm and "gate_proj" not in vllm
    stats = [(f"{L1}.mlp.{m}_moe.gate.moe_statics.e_score_correction_bias", row) for m, row in (("text", 0),
                                                                                                ("vision", 1))]
    for name, row in stats:
        assert mapper._map_name_with_shard(name) == ("language_model.model.layers.1.mlp.e_score_correction_bias", row)
    assert mapper.map_name("model.vision_tower.blocks.0.attn.qkv.trellis") == "vision_model.blocks.0.attn.qkv.trellis"


def test_module_map_follows_the_names():
    qc = _config()
    qc.apply_vllm_mapper(Ernie4_5_VLMoeForConditionalGeneration.hf_to_vllm_mapper)
    assert sorted(qc.modules) == ["language_model.model.layers.1.mlp.text_experts",
                                  "language_model.model.layers.1.mlp.vision_experts",
                                  "language_model.model.layers.1.self_attn.q_proj",
                                  "vision_model.blocks.0.attn.qkv"]


def _mm(**kw):
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(get_multimodal_config=lambda: MultiModalConfig(**kw)))
    return mock.patch("vllm.config.get_current_vllm_config", return_value=vllm_config)


def test_towers_only_with_images_off_and_16bit_expert_stacks_refused():
    qc = _config()
    qc.apply_vllm_mapper(Ernie4_5_VLMoeForConditionalGeneration.hf_to_vllm_mapper)
    tower = mock.MagicMock(spec=QKVParallelLinear)
    with _mm(language_model_only=True):
        assert isinstance(qc.get_quant_method(tower, "vision_model.blocks.0.attn.qkv"), UnquantizedLinearMethod)
    with _mm(limit_per_prompt={"image": 0, "video": 0}):
        assert isinstance(qc.get_quant_method(tower, "resampler_model.spatial_linear1"), UnquantizedLinearMethod)
    with _mm(limit_per_prompt={"image": 1, "video": 0}), pytest.raises(
            ValueError, match="vision_model.blocks.0.attn.qkv: ccq serves ERNIE-4.5-VL's language model only; "
                              "start vLLM with --language-model-only"):
        qc.get_quant_method(tower, "vision_model.blocks.0.attn.qkv")
    sixteen = _config(modules=(f"{L1}.mlp.text_moe.experts",))  # vision experts kept 16-bit
    sixteen.apply_vllm_mapper(Ernie4_5_VLMoeForConditionalGeneration.hf_to_vllm_mapper)
    with pytest.raises(ValueError, match="mlp.vision_experts: the checkpoint keeps these experts 16-bit"):
        sixteen.get_quant_method(mock.MagicMock(spec=RoutedExperts), "language_model.model.layers.1.mlp.vision_experts")
