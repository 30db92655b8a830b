"""`calibration="synthetic"`: calibration without user data, from the model's own tokenizer (whole-word
tokens inside the template's specials) or, for a causal LM in memory, from the model's own samples."""

import copy

import pytest
import torch
from click.testing import CliRunner
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import ccq
from ccq.calibration.synthetic import sampled_batches, template, word_batches, word_ids
from ccq.cli import main
from ccq.tiny import build_tiny_tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "42", "a", "\u4e8b", ",", "##s", "##ing"]


def wordpiece_tokenizer():
    """A BERT-style WordPiece tokenizer: specials, unused slots, a lone CJK character, punctuation and
    continuations besides the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 3), ("[SEP]", 4)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", mask_token="[MASK]",
                                   extra_special_tokens={"unused": "[unused0]"})


def test_word_ids_keep_whole_words_only():
    tok = wordpiece_tokenizer()
    assert tok.convert_ids_to_tokens(word_ids(tok).tolist()) == ["the", "cat", "sat", "on", "mat", "42", "a"]
    assert template(tok) == ([3], [4])
    bpe = build_tiny_tokenizer()
    words = bpe.convert_ids_to_tokens(word_ids(bpe).tolist())
    assert len(words) > 50 and all(t.startswith("\u0120") and t[1:].isalnum() for t in words)
    assert template(bpe) == ([], [])


def test_word_batches_are_framed_and_seeded():
    tok = wordpiece_tokenizer()
    a, b, c = (word_batches(tok, 3, 20, seed=s) for s in (0, 0, 1))
    assert [x["input_ids"].shape for x in a] == [(1, 20)] * 3
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
    ids = torch.cat([x["input_ids"][0] for x in a]).view(3, 20)
    assert (ids[:, 0] == 3).all() and (ids[:, -1] == 4).all()
    assert set(ids[:, 1:-1].unique().tolist()) <= set(word_ids(tok).tolist())
    with pytest.raises(ValueError, match="no room"):
        word_batches(tok, 1, 2)
    tok.model_max_length = 12  # an encoder's position limit caps the length
    assert word_batches(tok, 1, 20)[0]["input_ids"].shape == (1, 12)


def test_word_batches_mix_lengths_from_min_len():
    tok = wordpiece_tokenizer()
    a, b = (word_batches(tok, 40, 20, seed=0, min_len=5) for _ in range(2))
    lens = [x["input_ids"].shape[1] for x in a]
    assert min(lens) == 5 and max(lens) == 20 and len(set(lens)) > 8
    assert lens == [x["input_ids"].shape[1] for x in b]
    assert all(int(x["input_ids"][0, 0]) == 3 and int(x["input_ids"][0, -1]) == 4 for x in a)
    with pytest.raises(ValueError, match="min_len 2 leaves no room"):
        word_batches(tok, 1, 20, min_len=2)


def test_tokenizer_without_words_is_one_clear_error():
    from tokenizers import Tokenizer, models

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece({"[UNK]": 0, "##a": 1}, unk_token="[UNK]")),
                                   unk_token="[UNK]")
    with pytest.raises(ValueError, match="no whole-word tokens"):
        word_batches(bare, 1, 8, where="m")


def _tiny_llama(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def test_sampled_batches_come_from_the_model_and_are_seeded():
    tok = build_tiny_tokenizer()
    model = _tiny_llama(tok)
    a, b, c = (sampled_batches(model, tok, 3, 12, seed=s, batch_size=2) for s in (0, 0, 1))
    assert [x["input_ids"].shape for x in a] == [(1, 12)] * 3
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
    assert all(int(x["input_ids"][0, 0]) in set(word_ids(tok).tolist()) for x in a)  # started from a drawn word


def test_quantize_model_synthetic_calibrates_every_module():
    tok = wordpiece_tokenizer()
    torch.manual_seed(0)
    ref = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=32)).eval()
    m = ccq.quantize_model(copy.deepcopy(ref), 2, "synthetic", tokenizer=tok, samples=2, seq_len=16, L=8,
                           overrides=[("pooler.*", 16)])
    assert len(m.ccq_report) == 12 and all(e["hessian"] for e in m.ccq_report)
    assert m.config.quantization_config["damp"] == 0.1  # synthetic Hessians are damped harder by default
    assert m.config.quantization_config["asymmetric"] is False  # and keep the plain objective
    m = ccq.quantize_model(copy.deepcopy(ref), 2, "synthetic", tokenizer=tok, samples=2, seq_len=16, L=8,
                           overrides=[("pooler.*", 16)], damp=0.01, finetune_steps=3)
    assert m.config.quantization_config["damp"] == 0.01
    tuned = {e["tensor"].split(".")[2] for e in m.ccq_report if e["layer_finetune"]["steps"] == 3}
    assert tuned == {"0", "1"}  # both encoder layers fine-tuned on the synthetic inputs
    with pytest.raises(ValueError, match="pass tokenizer="):
        ccq.quantize_model(copy.deepcopy(ref), 2, "synthetic", L=8)
    with pytest.raises(ValueError, match="must be 'synthetic'"):
        ccq.quantize_model(copy.deepcopy(ref), 2, "random", L=8)


def test_quantize_model_synthetic_samples_a_causal_lm_at_the_codec_damping():
    tok = build_tiny_tokenizer()
    m = ccq.quantize_model(_tiny_llama(tok), 2, "synthetic", tokenizer=tok, samples=2, seq_len=8, L=8)
    assert all(e["hessian"] for e in m.ccq_report)
    assert m.config.quantization_config["damp"] == 0.01  # the 0.1 default is for vocabulary words only
    assert m.config.quantization_config["asymmetric"] is True  # sampled text is calibrated as real text


def test_cli_synthetic_calibration(tmp_path):
    tok = build_tiny_tokenizer()
    model = _tiny_llama(tok)
    src = tmp_path / "m"
    model.save_pretrained(str(src))
    r = CliRunner().invoke(main, ["quantize", str(src), "-o", str(tmp_path / "bare"), "--L", "8",
                                  "--calibration", "synthetic", "--samples", "2", "--seq-len", "16"])
    assert r.exit_code == 1 and "synthetic calibration needs the model's tokenizer" in r.output
    assert len(r.output.strip().splitlines()) == 1
    tok.save_pretrained(str(src))
    r = CliRunner().invoke(main, ["quantize", str(src), "-o", str(tmp_path / "neg"), "--damp", "-1"])
    assert r.exit_code == 1 and r.output.strip() == "ccq: error: damp must be >= 0, got -1.0"
    assert not (tmp_path / "neg").exists()
    r = CliRunner().invoke(main, ["quantize", str(src), "-o", str(tmp_path / "q"), "--L", "8",
                                  "--calibration", "synthetic", "--samples", "2", "--seq-len", "16", "--damp", "0.1"])
    assert r.exit_code == 0, r.output
    rep = ccq.load(tmp_path / "q").config.quantization_config
    assert rep["bits"] == 2 and rep["damp"] == 0.1 and rep["asymmetric"] is False
    import json

    report = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    assert all(e["hessian"] for e in report["tensors"]) and report["calibration"]["path"] == "synthetic"
