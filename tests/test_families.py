"""Every registered MoE family end to end: a tiny random checkpoint written by transformers'
`save_pretrained` (per-expert tensor names where the real checkpoints use them) -> `ccq quantize`
with calibration -> `ccq.load` and `from_pretrained` -> `ccq eval ppl`, and the quantized logits
closer to the 16-bit ones than RTN g64 at the same bits."""

import json
import random

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import ccq
from ccq.cli import main
from ccq.eval.synthetic import write_text_dataset
from ccq.format.source import SourceCheckpoint
from ccq.models.arch.gpt_oss import QuantGptOssExperts
from ccq.models.baseline import rtn_model
from ccq.models.quant_modules import QuantLinear, QuantMoeExperts
from ccq.tiny import build_tiny_model
from pipeline_helpers import WORDS

# family: (a checkpoint name of the family's published layout, the quantized experts module of layer 1, its class)
FAMILIES = {
    "qwen3_moe": ("model.layers.1.mlp.experts.7.up_proj.weight", "model.layers.1.mlp.experts", QuantMoeExperts),
    "mixtral": ("model.layers.1.block_sparse_moe.experts.3.w3.weight", "model.layers.1.mlp.experts",
                QuantMoeExperts),
    "deepseek_v3": ("model.layers.1.mlp.experts.7.up_proj.weight", "model.layers.1.mlp.experts", QuantMoeExperts),
    # fused, transposed [E, H, 2I] with biases, as published: no per-expert names
    "gpt_oss": ("model.layers.1.mlp.experts.gate_up_proj_bias", "model.layers.1.mlp.experts", QuantGptOssExperts),
}


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    return write_text_dataset(tmp_path_factory.mktemp("text") / "text.parquet", n_docs=8)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, text_data):
    """(name, 16-bit dir, 2-bit packed dir) of one family."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    src = build_tiny_model(name, root / "src")
    q = root / "q2"
    run("quantize", src, "-o", q, "--bits", 2, "--L", 8, "--calibration", text_data, "--samples", 4,
        "--seq-len", 32)
    return name, src, q


def batch(src):
    words = " ".join(random.Random(3).choices(WORDS, k=48))
    return AutoTokenizer.from_pretrained(str(src))(words, return_tensors="pt")["input_ids"]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_checkpoint_uses_the_published_layout(family):
    name, src, _ = family
    keys = set(SourceCheckpoint(src).keys())
    per_expert = ".experts.3." in FAMILIES[name][0] or ".experts.7." in FAMILIES[name][0]
    assert FAMILIES[name][0] in keys
    assert any(k.endswith("experts.gate_up_proj") for k in keys) != per_expert


def test_quantized_logits_beat_rtn_g64_and_from_pretrained_agrees(family):
    name, src, q = family
    qc = json.loads((q / "config.json").read_text())["quantization_config"]
    _, experts, kind = FAMILIES[name]
    assert qc["modules"][experts] == 2 and qc["L"] == 8
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    rtn = rtn_model(AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval(), qc["modules"])
    loaded = ccq.load(q, dtype=torch.float32)
    assert isinstance(loaded.get_submodule(experts), kind)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) > 0
    hf = AutoModelForCausalLM.from_pretrained(str(q), dtype=torch.float32).eval()
    ids = batch(src)
    with torch.no_grad():
        r, a, b, c = (m(input_ids=ids).logits for m in (ref, loaded, rtn, hf))
    assert torch.isfinite(a).all()
    assert rel(a, r) < rel(b, r), (name, rel(a, r), rel(b, r))
    torch.testing.assert_close(c, a)


def test_eval_ppl_of_the_packed_model(family, text_data, tmp_path):
    _, src, q = family
    run("eval", "ppl", "--model", q, "--reference", src, "--data", text_data, "--seq-len", 32, "--limit", 2,
        "--out", tmp_path)
    r = json.loads((tmp_path / "ppl.json").read_text())
    assert r["windows"] == 2 and r["kl"]["mean"] > 0 and torch.isfinite(torch.tensor(r["model"]["perplexity"]))
