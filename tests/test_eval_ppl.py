"""`ccq eval ppl` end to end on tiny models: windows, perplexity, KL, agreement, reports."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from ccq.cli import main
from ccq.eval import evaluate_perplexity, load_for_eval, make_windows
from ccq.eval.synthetic import generate_text, write_text_dataset
from ccq.tiny import build_tiny_ernie_vl, build_tiny_tokenizer, perturbed_copy


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    ref = build_tiny_ernie_vl(root / "ref")
    return {"root": root, "ref": ref, "pert": perturbed_copy(ref, root / "pert", rel_noise=0.2, seed=1),
            "data": write_text_dataset(root / "text.parquet", n_docs=12)}


def run_ppl(*args):
    result = CliRunner().invoke(main, ["eval", "ppl", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("n, seq_len, stride, bos", [(100, 16, 16, True), (100, 16, 16, False), (101, 16, 5, True),
                                                      (37, 16, 7, False), (10, 16, 4, True), (16, 16, 16, False)])
def test_windows_score_every_token_once(n, seq_len, stride, bos):
    windows = make_windows(n, seq_len, stride, bos)
    scored = [j for w in windows for j in range(w.score_from, w.end)]
    if bos:
        expected = list(range(n))  # BOS gives every window's first token a prediction
    elif stride == seq_len:
        expected = [j for j in range(n) if j % seq_len]  # disjoint windows without BOS: a start has no context
    else:
        expected = list(range(1, n))
    assert scored == expected
    for w in windows:
        assert w.end - w.begin <= seq_len and w.begin <= w.score_from < w.end
        if w.begin > 0:  # every scored token keeps the overlap as context
            assert w.score_from - w.begin >= seq_len - stride


def test_windows_reject_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        make_windows(100, 16, 17, True)


def test_perplexity_matches_the_model_loss(dirs):
    """One window: our perplexity equals exp of transformers' own shifted cross-entropy."""
    em = load_for_eval(dirs["ref"])
    text = generate_text(3)[0]
    r = evaluate_perplexity(em, text, seq_len=24, limit=1, progress=False)
    tok = em.tokenizer
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"][:24]])
    with torch.no_grad():
        loss = em.model(input_ids=ids, labels=ids).loss.item()
    assert r["scored_tokens"] == 24 and r["windows"] == 1
    assert r["model"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert "reference" not in r and "kl" not in r


def test_cli_model_against_itself_has_zero_kl(dirs, tmp_path):
    out = tmp_path / "out"
    result = run_ppl("--model", dirs["ref"], "--reference", dirs["ref"], "--data", dirs["data"], "--seq-len", 32,
                     "--limit", 4, "--batch-size", 2, "--out", out)
    r = json.loads((out / "ppl.json").read_text())
    assert r["kl"] == {"mean": 0.0, "p99": 0.0, "max": 0.0}
    assert r["top1_agreement"] == 1.0 and r["perplexity_ratio"] == 1.0
    assert r["windows"] == 4 and r["scored_tokens"] == 4 * 32
    assert "fixed windows of 32 tokens every 32 tokens" in r["convention"]
    assert "fixed windows of 32 tokens" in (out / "ppl.md").read_text() and "Convention" in result.output
    assert (out / "ppl_kl_by_position.png").stat().st_size > 0


def test_cli_perturbed_copy_has_positive_kl(dirs, tmp_path):
    out = tmp_path / "out"
    run_ppl("--model", dirs["pert"], "--reference", dirs["ref"], "--data", dirs["data"], "--seq-len", 32,
            "--stride", 16, "--limit", 4, "--batch-size", 3, "--out", out)
    r = json.loads((out / "ppl.json").read_text())
    assert r["kl"]["mean"] > 0 and r["kl"]["max"] >= r["kl"]["p99"] >= 0
    assert r["model"]["perplexity"] != r["reference"]["perplexity"]
    assert 0 <= r["top1_agreement"] <= 1
    assert r["scored_tokens"] == 32 + 3 * 16  # overlapping windows score only their new tokens
    assert sum(b["tokens"] for b in r["kl_by_position"]) == r["scored_tokens"]
    alone = tmp_path / "alone"
    run_ppl("--model", dirs["ref"], "--data", dirs["data"], "--seq-len", 32, "--stride", 16, "--limit", 4, "--out", alone)
    single = json.loads((alone / "ppl.json").read_text())
    assert single["model"]["perplexity"] == pytest.approx(r["reference"]["perplexity"], rel=1e-6)
    assert "kl" not in single and not (alone / "ppl_kl_by_position.png").exists()


def test_cli_text_only_model_and_plain_text_file(dirs, tmp_path):
    """A causal LM (no vision tower) loads through the AutoModelForCausalLM fallback; .txt is one document."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id))
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    txt = write_text_dataset(tmp_path / "wiki.txt", n_docs=5)
    jsonl = write_text_dataset(tmp_path / "wiki.jsonl", n_docs=5)
    for data, out in ((txt, tmp_path / "o1"), (jsonl, tmp_path / "o2")):
        run_ppl("--model", tmp_path / "llama", "--data", data, "--seq-len", 16, "--limit", 2, "--out", out)
        r = json.loads((out / "ppl.json").read_text())
        assert math.isfinite(r["model"]["perplexity"]) and r["model"]["perplexity"] > 1
    assert "the whole file as one document" in json.loads((tmp_path / "o1" / "ppl.json").read_text())["convention"]


def test_quantile_matches_torch():
    from ccq.eval.perplexity import _quantile

    x = torch.rand(5001, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert _quantile(x, 0.99) == pytest.approx(torch.quantile(x, 0.99).item(), rel=1e-12)
    assert _quantile(torch.tensor([2.0]), 0.99) == 2.0
