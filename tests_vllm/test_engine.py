"""vLLM's offline engine serves ccq checkpoints written by `ccq quantize`:
the plugin loads the packed folder as is and greedy generation matches `ccq.load` token for token,
with the same log-probabilities."""

import json

import pytest
import torch
from click.testing import CliRunner

from ccq.cli import main

from .engine import ccq_greedy, moe_block_inputs, vllm_greedy
from .models import tiny_ernie45_moe, tiny_ernie45_vl, tiny_qwen3, tiny_qwen3_moe

PROMPTS = [[1, 5, 9, 33, 70], [7, 3, 101, 12, 45, 90, 2, 64, 11]]
STEPS = 6


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    return _quantize_cli(tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "src"), 3)


def _quantize_cli(src, bits):
    out = src.parent / "ccq"
    r = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--bits", str(bits), "--L", "8"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return _quantize_cli(tiny_qwen3_moe(tmp_path_factory.mktemp("qwen3moe") / "src"), 2)


def _check_matches_ccq_load(ckpt, **engine_args):
    got = vllm_greedy(ckpt, PROMPTS, STEPS, **engine_args)
    for prompt, g in zip(PROMPTS, got):
        ref = ccq_greedy(ckpt, prompt, STEPS)
        assert g["tokens"] == ref["tokens"]
        torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(ref["logprobs"]), atol=2e-3, rtol=0)
    return got


def test_dense_qwen3_from_ccq_quantize(dense_ckpt):
    qc = json.loads((dense_ckpt / "config.json").read_text())["quantization_config"]
    assert qc["modules"]["model.layers.0.self_attn.q_proj"] == 3  # q/k/v and gate/up are fused by vLLM
    _check_matches_ccq_load(dense_ckpt)


def test_qwen3_moe_from_ccq_quantize(moe_ckpt):
    qc = json.loads((moe_ckpt / "config.json").read_text())["quantization_config"]
    assert qc["modules"]["model.layers.1.mlp.experts"] == 2  # the fused expert stacks are packed
    # vLLM's default compiled mode (torch.compile, fullgraph): the kernels run as opaque custom ops
    _check_matches_ccq_load(moe_ckpt, enforce_eager=False)


def test_ernie45_moe_shared_expert_and_router_statistics(tmp_path):
    ckpt = _quantize_cli(tiny_ernie45_moe(tmp_path / "src"), 4)
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["modules"]["model.layers.1.mlp.experts"] == 4
    assert qc["modules"]["model.layers.1.mlp.shared_experts.gate_proj"] == 4
    _check_matches_ccq_load(ckpt)


@pytest.fixture(scope="module")
def vl_ckpt(tmp_path_factory):
    return _quantize_cli(tiny_ernie45_vl(tmp_path_factory.mktemp("ernie45vl") / "src"), 4)


def test_ernie45_vl_language_model_text_and_vision_experts(vl_ckpt):
    """ERNIE-4.5-VL as `ccq quantize` writes it (native config and names, fused text/vision expert stacks)
    in vLLM's ERNIE-4.5-VL model (Baidu's flat config, two FusedMoE blocks per layer), language model only.
    Text prompts run the text experts; the vision experts (and the vision row of the router
    statistics) run on one MoE block with image tokens mixed in, against ccq's block."""
    ckpt = vl_ckpt
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["modules"]["model.language_model.layers.1.mlp.vision_moe.experts"] == 4
    got = _check_matches_ccq_load(ckpt, language_model_only=True, moe_block=[1, 64])

    import ccq

    block = ccq.load(ckpt, dtype=torch.float32).model.language_model.layers[1].mlp
    x, visual = moe_block_inputs(64)
    with torch.no_grad():
        want = block(x[None], moe_mm_token_type_ids=visual[None].long())[0][0]  # (hidden, router logits)
        text_only = block(x[None])[0][0]
    assert (want - text_only)[visual].abs().max() > 0.1  # the vision experts make a difference
    torch.testing.assert_close(torch.tensor(got[-1]["moe_block"]), want, atol=1e-4, rtol=1e-4)

