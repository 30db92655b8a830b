"""`ccq plan --tp N`: what each GPU holds under vLLM tensor parallelism, and the sizes refused."""

import json

from click.testing import CliRunner

from ccq.cli import main


def _plan(*args):
    r = CliRunner().invoke(main, ["plan", *args])
    return r.exit_code, r.output


def test_ernie_28b_split_two_and_four_ways():
    code, out = _plan("ernie-4.5-vl-28b-a3b", "--bits", "2", "--json", "--tp", "2")
    assert code == 0, out
    p = json.loads(out)
    t2 = p["tensor_parallel"]
    packed = sum(p["quantized_bytes"].values())
    # half of the packed bytes each, plus the few input Hadamard blocks two ranks both keep
    assert packed / 2 < t2["per_gpu_packed_bytes"] < packed / 2 * 1.01
    assert t2["per_gpu_bytes"] < p["total_bytes"] / 2 + 0.05 * p["total_bytes"]
    assert t2["per_gpu_kv_cache_bytes"] * 2 == p["kv_cache_bytes"]
    code, out = _plan("ernie-4.5-vl-28b-a3b", "--bits", "2", "--tp", "4", "--gpus", "4x24GB")
    assert code == 0 and "tensor-parallel 4 (vLLM): each GPU" in out and "fits: yes" in out.splitlines()[-1]


def test_sizes_vllm_or_the_tiles_refuse(tmp_path):
    code, out = _plan("ernie-4.5-vl-28b-a3b", "--tp", "8")
    assert code == 1 and out.strip() == "ccq: error: tensor-parallel size 8 does not divide the 20 attention heads"
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 128, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 32}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, out = _plan(str(tmp_path / "config.json"), "--tp", "4")
    assert code == 1
    assert "model.layers.0.mlp.gate_proj: tensor-parallel size 4 splits its 96 rows into pieces of 24, which cuts a 16x16 tile" in out
    code, out = _plan(str(tmp_path / "config.json"), "--tp", "2", "--json")
    assert code == 0 and json.loads(out)["tensor_parallel"]["tp"] == 2
