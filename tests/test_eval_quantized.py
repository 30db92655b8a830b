"""The whole user path: `ccq quantize` a tiny model, then `ccq eval` it against its 16-bit source."""

import json

import pytest
from click.testing import CliRunner

from ccq.cli import main
from ccq.eval.synthetic import write_chart_dataset, write_text_dataset
from ccq.tiny import build_tiny_ernie_vl, build_tiny_llava


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("quant-eval")


def test_ppl_and_kl_of_a_quantized_ernie(root):
    ref = build_tiny_ernie_vl(root / "ernie")
    data = write_text_dataset(root / "text.parquet", n_docs=8)
    stats = {}
    for bits in (2, 4):
        q = root / f"ernie-q{bits}"
        run("quantize", ref, "-o", q, "--bits", bits, "--L", 8 if bits == 2 else 12)
        run("eval", "ppl", "--model", q, "--reference", ref, "--data", data, "--seq-len", 32, "--limit", 3,
            "--out", root / f"ppl{bits}")
        stats[bits] = json.loads((root / f"ppl{bits}" / "ppl.json").read_text())
    for r in stats.values():
        assert r["kl"]["mean"] > 0 and r["windows"] == 3
        assert r["reference"]["perplexity"] == stats[2]["reference"]["perplexity"]
    assert stats[4]["kl"]["mean"] < stats[2]["kl"]["mean"]  # more bits, closer to the 16-bit model
    assert stats[4]["top1_agreement"] >= stats[2]["top1_agreement"]


def test_chartqa_drift_of_a_quantized_vlm(root):
    """A generic (non-ERNIE) VLM goes through the nn.Linear path; its processor needs no torchvision."""
    ref = build_tiny_llava(root / "llava")
    data = write_chart_dataset(root / "charts.parquet", n_charts=2)
    q = root / "llava-q4"
    run("quantize", ref, "-o", q, "--bits", 4, "--L", 8)
    out = root / "chartqa"
    run("eval", "chartqa", "--model", q, "--reference", ref, "--data", data, "--max-new-tokens", 4, "--out", out)
    r = json.loads((out / "chartqa.json").read_text())
    assert r["splits"]["all"]["n"] == 8
    assert 0.0 <= r["splits"]["all"]["agreement"] <= 1.0
