"""One sequential calibration core and one settings object: `quantize_model` (in memory) and
`quantize_model_dir` give the same bytes for the same calibration, and the QuantSettings a
checkpoint was made with come back from its quantization_config."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import ccq
from ccq.calibration.data import calibration_batches
from ccq.eval.synthetic import write_text_dataset
from ccq.format.qconfig import settings_of
from ccq.format.source import read_json
from ccq.models.arch import resolve
from ccq.models.settings import QuantSettings
from ccq.tiny import build_tiny_model
from pipeline_helpers import crash_then_resume


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_tiny_model("mixtral", tmp_path_factory.mktemp("core") / "src")


def test_in_memory_and_from_the_folder_give_the_same_bytes(src, tmp_path):
    data = write_text_dataset(tmp_path / "t.parquet", n_docs=4)
    settings = QuantSettings.of(2, L=8, seed=3, overrides=[("*.self_attn.*", 3)])
    ccq.quantize_model_dir(src, tmp_path / "q", calibration=data, samples=3, seq_len=24, settings=settings,
                           progress=False)
    arch = resolve(read_json(src / "config.json"))
    batches = calibration_batches(data, src, arch.config, 3, 24, arch.adapter)
    model = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ccq.quantize_model(model, calibration=batches, settings=settings)
    loaded = ccq.load(tmp_path / "q").state_dict()
    mem = model.state_dict()
    packed = [k for k in loaded if k.endswith(".trellis")]
    assert len(packed) > 4 and any("self_attn" in k for k in packed)
    for k in packed + [k.replace(".trellis", ".scales") for k in packed]:
        assert torch.equal(loaded[k], mem[k]), k
    assert [e["tensor"] for e in model.ccq_report] == [e["tensor"] for e in
                                                       json.loads((tmp_path / "q" / "quantization_report.json").read_text())["tensors"]]


def test_settings_round_trip_through_quantization_config(src, tmp_path):
    settings = QuantSettings.of(3, L=10, seed=7, rotate_output=True, hadamard_block=32, damp=0.02,
                                overrides=[("*.experts", 2), ("*.o_proj", 16)])
    ccq.quantize_model_dir(src, tmp_path / "q", settings=settings, progress=False)
    qc = read_json(tmp_path / "q" / "config.json")["quantization_config"]
    assert settings_of(qc) == settings
    assert qc["modules"]["model.layers.0.mlp.experts"] == 2 and "model.layers.0.self_attn.o_proj" in qc["modules_kept_16bit"]
    model = ccq.load(tmp_path / "q")
    assert model.model.layers[0].self_attn.q_proj.signs_out is not None  # rotate_output read back


@pytest.mark.parametrize("bad", [dict(bits=5), dict(bits=2, overrides=[("*", 5)]), dict(bits=2, L=3)])
def test_bad_settings_fail_before_any_output(src, tmp_path, bad):
    with pytest.raises(ValueError):
        ccq.quantize_model_dir(src, tmp_path / "q", progress=False, **bad)
    assert not (tmp_path / "q").exists()


def test_calibrated_target_bpw_streams_the_in_memory_choice_and_resumes_it(src, tmp_path, monkeypatch):
    """With calibration data, the streaming quantizer costs the modules with the 16-bit model's Hessians
    (a pre-pass, unit by unit), as the in-memory one does from one pass: the same data give the same
    bits, and a resumed run takes the costs it kept instead of measuring again."""
    data = write_text_dataset(tmp_path / "t.parquet", n_docs=4)
    settings = QuantSettings.of(2, L=8, seed=3, target_bpw=2.6)
    kw = dict(calibration=data, samples=3, seq_len=24, settings=settings, progress=False)
    ccq.quantize_model_dir(src, tmp_path / "q", **kw)
    streamed = read_json(tmp_path / "q" / "config.json")["quantization_config"]["modules"]
    assert not list((tmp_path / "q").glob("calib-*"))
    arch = resolve(read_json(src / "config.json"))
    model = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ccq.quantize_model(model, calibration=calibration_batches(data, src, arch.config, 3, 24, arch.adapter),
                       settings=settings)
    assert model.config.quantization_config["modules"] == streamed
    assert len(set(streamed.values())) >= 2

    crash_then_resume(monkeypatch, src, tmp_path / "r", "calib-allocation-costs.json", **kw)
    assert read_json(tmp_path / "r" / "config.json")["quantization_config"]["modules"] == streamed
