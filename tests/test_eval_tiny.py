"""The tiny model builders other tests rely on: deterministic, loadable offline, processors that work."""

import pytest
import torch
from safetensors.torch import load_file

from ccq.tiny import build_tiny_ernie_vl, build_tiny_llava, ernie_processor_available, perturbed_copy


@pytest.fixture(scope="module")
def ernie_dir(tmp_path_factory):
    return build_tiny_ernie_vl(tmp_path_factory.mktemp("ernie"))


def test_ernie_builder_is_deterministic(ernie_dir, tmp_path):
    again = build_tiny_ernie_vl(tmp_path / "again")
    assert (again / "tokenizer.json").read_text() == (ernie_dir / "tokenizer.json").read_text()
    a, b = load_file(ernie_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = load_file(build_tiny_ernie_vl(tmp_path / "seed1", seed=1) / "model.safetensors")
    assert not torch.equal(other["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_ernie_dir_loads_with_auto_classes(ernie_dir):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ernie_dir)
    model = AutoModelForImageTextToText.from_pretrained(ernie_dir)
    cfg = model.config
    assert cfg.model_type == "ernie4_5_vl_moe"
    assert tok.image_token_id == cfg.image_token_id and tok.image_start_token_id == cfg.image_start_token_id
    assert cfg.text_config.vocab_size % 16 == 0 and cfg.text_config.vocab_size >= len(tok)
    experts = model.model.language_model.layers[1].mlp.text_moe.experts.gate_up_proj
    assert experts.shape == (4, 64, 64) and experts.dtype == torch.bfloat16
    ids = tok("The river built a stone tower.", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], cfg.text_config.vocab_size)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<s>User: hi\nAssistant: <think>\n\n</think>\n\n"


@pytest.mark.skipif(not ernie_processor_available(), reason="Ernie4_5_VLMoeProcessor needs torchvision")
def test_ernie_processor_round_trip(ernie_dir):
    from transformers import AutoProcessor

    from ccq.eval.synthetic import chart_rows

    proc = AutoProcessor.from_pretrained(ernie_dir)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which bar is highest?"}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    batch = proc(text=[text], images=[chart_rows(1)[0]["image"]], return_tensors="pt")
    assert (batch["input_ids"] == proc.image_token_id).sum() > 0 and "pixel_values" in batch


def test_llava_processor_loads_offline(tmp_path):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(build_tiny_llava(tmp_path / "llava"), local_files_only=True)
    assert type(proc).__name__ == "LlavaProcessor" and proc.image_processor is not None


def test_perturbed_copy_changes_matrices_only(ernie_dir, tmp_path):
    dst = perturbed_copy(ernie_dir, tmp_path / "pert", rel_noise=0.1, seed=3)
    a, b = load_file(ernie_dir / "model.safetensors"), load_file(dst / "model.safetensors")
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"  # transformers saves ERNIE in Baidu's per-expert layout
    rel = (b[name].float() - a[name].float()).std() / a[name].float().std()
    assert 0.05 < rel < 0.2
    assert torch.equal(a["model.norm.weight"], b["model.norm.weight"])
    assert (dst / "tokenizer.json").is_file() and (dst / "config.json").is_file()
