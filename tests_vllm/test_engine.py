"""vLLM's offline engine serves ccq checkpoints written by `ccq quantize` / `ccq.save_quantized`:
the plugin loads the packed folder as is and greedy generation matches `ccq.load` token for token,
with the same log-probabilities."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import ccq
from ccq.cli import main

from .engine import ccq_greedy, vllm_greedy
from .models import tiny_ernie45_moe, tiny_qwen3, tiny_qwen3_moe

PROMPTS = [[1, 5, 9, 33, 70], [7, 3, 101, 12, 45, 90, 2, 64, 11]]
STEPS = 6


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    src = tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "src")
    out = src.parent / "ccq"
    r = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--bits", "3", "--L", "8"])
    assert r.exit_code == 0, r.output
    return out


def _quantize_in_memory(src, bits):
    """`ccq quantize` streams per-expert checkpoints of ERNIE-4.5-VL only: other MoE go through the API."""
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    ccq.quantize_model(model, bits=bits, L=8)
    return ccq.save_quantized(model, src.parent / "ccq", copy_from=src)


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return _quantize_in_memory(tiny_qwen3_moe(tmp_path_factory.mktemp("qwen3moe") / "src"), 2)


def _check_matches_ccq_load(ckpt):
    got = vllm_greedy(ckpt, PROMPTS, STEPS)
    for prompt, g in zip(PROMPTS, got):
        ref = ccq_greedy(ckpt, prompt, STEPS)
        assert g["tokens"] == ref["tokens"]
        torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(ref["logprobs"]), atol=2e-3, rtol=0)


def test_dense_qwen3_from_ccq_quantize(dense_ckpt):
    qc = json.loads((dense_ckpt / "config.json").read_text())["quantization_config"]
    assert qc["modules"]["model.layers.0.self_attn.q_proj"] == 3  # q/k/v and gate/up are fused by vLLM
    _check_matches_ccq_load(dense_ckpt)


def test_qwen3_moe_packed_experts(moe_ckpt):
    qc = json.loads((moe_ckpt / "config.json").read_text())["quantization_config"]
    assert qc["modules"]["model.layers.1.mlp.experts"] == 2  # the fused expert stacks are packed
    _check_matches_ccq_load(moe_ckpt)


def test_ernie45_moe_shared_expert_and_router_statistics(tmp_path):
    ckpt = _quantize_in_memory(tiny_ernie45_moe(tmp_path / "src"), 4)
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["modules"]["model.layers.1.mlp.experts"] == 4
    assert qc["modules"]["model.layers.1.mlp.shared_experts.gate_proj"] == 4
    _check_matches_ccq_load(ckpt)
