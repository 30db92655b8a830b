"""Resume, determinism, atomic output, bounded memory, bad input."""

import json

import pytest
from click.testing import CliRunner

from ccq.pipeline import quantize_model_dir, units
from ccq.cli import main
from ccq.tiny import build_tiny_ernie_vl
from pipeline_helpers import WORDS, files


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def text_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("textcal") / "calib.jsonl"
    rows = [{"text": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(30))} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_resume_after_kill_is_byte_identical_and_refuses_changed_options(tiny_ernie, text_jsonl, tmp_path,
                                                                         monkeypatch):
    args = ["--bits", 2, "--L", 8, "--calibration", text_jsonl, "--samples", 1, "--seq-len", 16]
    ref = tmp_path / "ref"
    assert run_cli("quantize", tiny_ernie, "-o", ref, *args).exit_code == 0
    rep = json.loads((ref / "quantization_report.json").read_text())
    # text-only calibration: the vision experts, vision tower and resampler fall back to data-free search
    vision = ("vision_moe", "vision_tower", "resampler_model")
    assert sorted(rep["fallbacks"]) == sorted(e["tensor"] for e in rep["tensors"] if any(v in e["tensor"] for v in vision))
    assert sum("vision_moe" in f for f in rep["fallbacks"]) == 4 and len(rep["fallbacks"]) > 4

    real = units.quantize_module

    def crash(model, name, *a, **k):
        if ".layers.2." in name:
            raise KeyboardInterrupt  # killed in the middle of the last layer
        return real(model, name, *a, **k)

    out = tmp_path / "out"
    monkeypatch.setattr(units, "quantize_module", crash)
    assert run_cli("quantize", tiny_ernie, "-o", out, *args).exit_code != 0
    monkeypatch.setattr(units, "quantize_module", real)
    partial = tmp_path / ".out.ccq-partial"
    assert not out.exists() and partial.is_dir()
    shards = sorted(p.name for p in partial.glob("model-*.safetensors"))
    assert shards == ["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
                      "model-00003-of-00004.safetensors"]

    r = run_cli("quantize", tiny_ernie, "-o", out, "--bits", 4, *args[2:], "--resume")
    assert r.exit_code == 1 and "cannot resume" in r.output and partial.is_dir()

    calls = []
    monkeypatch.setattr(units, "quantize_module", lambda m, n, *a, **k: calls.append(n) or real(m, n, *a, **k))
    r = run_cli("quantize", tiny_ernie, "-o", out, *args, "--resume")
    assert r.exit_code == 0, r.output
    assert calls and all(".layers.2." in n for n in calls)  # only the unfinished layer was redone
    assert not partial.exists()
    assert files(out) == files(ref)


def test_peak_materialised_weights_do_not_grow_with_layers(tmp_path, monkeypatch):
    peaks = {}
    real = units.materialise

    def watch(model, names, get, device):
        real(model, names, get, device)
        live = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                   if t.device.type != "meta")
        peaks[key] = max(peaks.get(key, 0), live) if names and "layers" in names[0] else peaks.get(key, 0)

    monkeypatch.setattr(units, "materialise", watch)
    for key in (3, 6):  # everything kept 16-bit: this measures the streaming, not the codec
        src = build_tiny_ernie_vl(tmp_path / f"m{key}", layers=key)
        quantize_model_dir(src, tmp_path / f"q{key}", 2, overrides=[("*", 16)], progress=False)
        assert len(list((tmp_path / f"q{key}").glob("model-*.safetensors"))) == key + 1
    assert peaks[3] > 0 and peaks[3] == peaks[6]


def _model_copy(tiny_ernie, tmp_path):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(tiny_ernie, d)
    return d


def _assert_clean_error(r, tmp_path, *needles):
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.replace("\r", "\n").splitlines() if ln.startswith("ccq: error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.ccq-partial").exists()


def test_missing_model_dir(tmp_path):
    _assert_clean_error(run_cli("quantize", tmp_path / "nope", "-o", tmp_path / "out"), tmp_path, "nope")


def test_unknown_architecture(tiny_ernie, tmp_path):
    d = _model_copy(tiny_ernie, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="not_a_model", architectures=["NotAModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    _assert_clean_error(run_cli("quantize", d, "-o", tmp_path / "out"), tmp_path, "unknown architecture")


def test_truncated_shard(tiny_ernie, tmp_path):
    d = _model_copy(tiny_ernie, tmp_path)
    shard = d / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    _assert_clean_error(run_cli("quantize", d, "-o", tmp_path / "out"), tmp_path, "model.safetensors", "truncated")


def test_tensor_missing_from_index(tiny_ernie, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _model_copy(tiny_ernie, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.2.mlp.experts.5.up_proj.weight"]
    (d / "model.safetensors").unlink()
    save_file(sd, str(d / "model-00001-of-00001.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in sd}}))
    _assert_clean_error(run_cli("quantize", d, "-o", tmp_path / "out"), tmp_path,
                        "model.layers.2.mlp.experts.5.up_proj.weight")


def test_nan_weights(tiny_ernie, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _model_copy(tiny_ernie, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.2.self_attn.o_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(d / "model.safetensors"))
    r = run_cli("quantize", d, "-o", tmp_path / "out", "--L", 8)
    _assert_clean_error(r, tmp_path, "model.layers.2.self_attn.o_proj.weight", "NaN")


@pytest.mark.parametrize("bits", [1, 5])
def test_bits_out_of_range(tiny_ernie, tmp_path, bits):
    _assert_clean_error(run_cli("quantize", tiny_ernie, "-o", tmp_path / "out", "--bits", bits), tmp_path, "bits")


def test_bad_codec_option(tiny_ernie, tmp_path):
    _assert_clean_error(run_cli("quantize", tiny_ernie, "-o", tmp_path / "out", "--L", 5), tmp_path, "L must be")
