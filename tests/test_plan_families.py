"""`ccq plan` on the shipped configs of public models of every family: the routed experts are all
packed, at about bits/8 bytes per weight plus the per-row scales."""

import pytest

from ccq.plan.footprint import plan_footprint

# name: (routed expert weights of the published model, from its config)
EXPERT_WEIGHTS = {
    "qwen3-30b-a3b": 48 * 128 * 3 * 2048 * 768,
    "mixtral-8x7b": 32 * 8 * 3 * 4096 * 14336,
    "deepseek-v3": (61 - 3) * 256 * 3 * 7168 * 2048,
    "gpt-oss-20b": 24 * 32 * 3 * 2880 * 2880,
}


@pytest.mark.parametrize("name", sorted(EXPERT_WEIGHTS))
def test_plan_of_a_public_config(name):
    p = plan_footprint(name, 2, context=0, gpus=None)
    experts = p["groups"]["routed_experts"]
    per_weight = experts / EXPERT_WEIGHTS[name]
    assert 0.25 <= per_weight < 0.28, per_weight  # 2 bits + fp16 scales per row (+ 16-bit biases for GPT-OSS)
    assert p["quantized_bytes"]["routed_experts"] >= 0.99 * experts
    assert p["total_bytes"] < 2 * experts + p["groups"]["embeddings"]
