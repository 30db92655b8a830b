"""`ccq synth`: random-code checkpoints of a config's shape that `ccq.load` reads and runs."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ccq
from ccq.cli import main
from ccq.models.quant_modules import QuantLinear, QuantMoeExperts
from ccq.plan.footprint import plan_footprint
from ccq.plan.synth import synth_model, synth_tensor
from ccq.tiny import tiny_ernie_vl_config


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    tiny_ernie_vl_config(3).save_pretrained(str(d / "src"))
    r = run_cli("synth", d / "src", "--bits", 2, "-o", d / "q2", "--module-bits", "*.vision_tower.*=4")
    assert r.exit_code == 0, r.output
    return d


def tensor_bytes(folder):
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            total += sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys())
    return total


def test_synth_loads_runs_and_matches_plan(tiny):
    m = ccq.load(tiny / "q2")
    layer = m.model.language_model.layers[1]
    assert isinstance(layer.mlp.text_moe.experts, QuantMoeExperts) and layer.mlp.text_moe.experts.bits == 2
    assert m.model.vision_tower.blocks[0].attn.qkv.bits == 4
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = m(input_ids=ids).logits
    assert torch.isfinite(logits).all() and logits.float().std() > 0
    plan = plan_footprint(tiny / "src", 2, overrides=[("*.vision_tower.*", 4)])
    assert tensor_bytes(tiny / "q2") == plan["total_bytes"]
    qc = json.loads((tiny / "q2" / "config.json").read_text())["quantization_config"]
    assert len(qc["modules"]) == plan["quantized_modules"]
    assert m.model.language_model.layers[1].mlp.text_moe.gate.weight.dtype == torch.float32  # routers kept fp32
    r = run_cli("inspect", tiny / "q2")
    assert r.exit_code == 0 and "routed_experts" in r.output


def test_in_memory_variant_equals_checkpoint(tiny):
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    on_disk = ccq.load(tiny / "q2")
    in_mem = synth_model(tiny / "src", 2, overrides=[("*.vision_tower.*", 4)])
    placed = ccq.load(tiny / "q2", device_map="auto", max_memory={"cpu": "1GiB"})
    assert placed.hf_device_map == {"": "cpu"}
    with torch.no_grad():
        a, b, c = (x(input_ids=ids).logits for x in (on_disk, in_mem, placed))
    assert torch.equal(a, b) and torch.equal(a, c)
    dense = synth_model(tiny / "src", None)
    assert isinstance(dense.model.language_model.layers[1].self_attn.q_proj, nn.Linear)
    assert not any(isinstance(x, (QuantLinear, QuantMoeExperts)) for x in dense.modules())
    assert not hasattr(dense.config, "quantization_config") or dense.config.quantization_config is None


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_random_codes_decode_to_realistic_weights(bits):
    qt = synth_tensor((3, 40, 72), bits, seed=5, scale=0.02, L=12)
    w = qt.dequantize()
    assert w.shape == (3, 40, 72) and torch.isfinite(w).all()
    assert 0.012 < float(w.std()) < 0.03
    assert qt.bits == bits and qt.L == 12


def test_synth_refuses_non_empty_output(tiny, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("synth", tiny / "src", "-o", out)
    assert r.exit_code == 1 and "--overwrite" in r.output and len(r.output.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine"


def test_generic_transformers_architecture(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": False}))
    r = run_cli("synth", cfg, "--bits", 3, "-o", tmp_path / "q")
    assert r.exit_code == 0, r.output
    plan = plan_footprint(cfg, 3, context=10)
    assert plan["kv_cache_bytes"] == 2 * 2 * 10 * 2 * 16 * 2
    assert tensor_bytes(tmp_path / "q") == plan["total_bytes"]
    m = ccq.load(tmp_path / "q")
    assert isinstance(m.model.layers[0].mlp.up_proj, QuantLinear) and m.model.layers[0].mlp.up_proj.bits == 3
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    with pytest.raises(ValueError, match="device_map"):
        ccq.load(tmp_path / "q", device_map="sideways")
