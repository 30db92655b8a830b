"""Which loader a model dir goes through: ccq-packed dirs via ccq.load, others via transformers."""

import json

import pytest
import torch

import ccq.format.loader
from ccq.eval import load_for_eval
from ccq.eval.loading import resolve_dtype
from ccq.tiny import build_tiny_llava


def test_ccq_packed_dir_goes_through_ccq_load(tmp_path, monkeypatch):
    src = build_tiny_llava(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "ccq", "bits": 2}
    (src / "config.json").write_text(json.dumps(config))
    calls = []

    def fake_load(path, device="cpu", dtype=None, device_map=None):  # ccq.load's signature
        calls.append((path, device, dtype, device_map))
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(ccq.format.loader, "load", fake_load)  # what ccq.load is
    em = load_for_eval(src, device="cpu", dtype="bfloat16")
    assert em.quantized and isinstance(em.model, torch.nn.Linear) and em.tokenizer is not None
    load_for_eval(src, device="auto", dtype="auto")
    assert calls == [(str(src), "cpu", torch.bfloat16, None), (str(src), "cpu", torch.bfloat16, "auto")]


def test_sixteen_bit_vlm_goes_through_transformers(tmp_path):
    em = load_for_eval(build_tiny_llava(tmp_path / "m"), need_processor=True)
    assert not em.quantized and type(em.model).__name__ == "LlavaForConditionalGeneration"
    assert em.model.dtype == torch.float32 and em.processor is not None  # 'auto' on CPU is float32


def test_resolve_dtype():
    assert resolve_dtype("auto", "cuda") is torch.bfloat16 and resolve_dtype("float16", "cpu") is torch.float16
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", "cpu")
