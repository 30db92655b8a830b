"""Test data for the pipeline tests: calibration words and Baidu's remote-code config flavour.

The tiny models themselves come from `ccq.tiny`."""

from __future__ import annotations

import json

WORDS = ("the a chart bar value shows year sales rose fell by percent in of and to is was what how many "
         "red blue green total highest lowest").split()


def remote_config(native: dict) -> dict:
    """The same tiny model described by a Baidu remote-code (`ernie4_5_moe_vl`) config.json."""
    from ccq.models.arch.ernie_vl import remote_config_dict

    return {**remote_config_dict(native),
            "auto_map": {"AutoConfig": "configuration_ernie_45t_vl.Ernie4_5_VLMoEConfig"}}


def write_remote_flavour(src, dst):
    """Copy a tiny model folder, replacing config.json with the remote-code flavour."""
    import shutil

    shutil.copytree(src, dst)
    native = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(remote_config(native), indent=2))
    return dst


def files(d) -> dict[str, bytes]:
    """The bytes of every file of a packed folder but the report (which holds timings)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "quantization_report.json"}


def crash_then_resume(monkeypatch, src, out, kept: str, **kw):
    """Quantize src into out, killed at layer 1; check the work folder kept the file `kept`; then resume,
    failing if the measuring pass runs again."""
    import pytest

    import ccq
    from ccq.pipeline import units

    real = units.quantize_module

    def crash(model, name, *a, **k):
        if ".layers.1." in name:
            raise KeyboardInterrupt
        return real(model, name, *a, **k)

    monkeypatch.setattr(units, "quantize_module", crash)
    with pytest.raises(KeyboardInterrupt):
        ccq.quantize_model_dir(src, out, **kw)
    assert (out.parent / f".{out.name}.ccq-partial" / kept).is_file()
    monkeypatch.setattr(units, "quantize_module", real)
    monkeypatch.setattr(units.Pipeline, "measure", lambda *a: pytest.fail("measured again on resume"))
    ccq.quantize_model_dir(src, out, resume=True, **kw)


def cli_quantize(tmp_path, out: str, *flags):
    """`ccq quantize` of a tiny Mixtral, calibrated on 2 x 16 tokens, with `flags`, into tmp_path/out: the
    CliRunner result and the written quantization_config (None when nothing was written)."""
    import json

    from click.testing import CliRunner

    from ccq.cli import main
    from ccq.eval.synthetic import write_text_dataset
    from ccq.tiny import build_tiny_model

    src = tmp_path / "src"
    if not src.exists():
        build_tiny_model("mixtral", src)
        write_text_dataset(tmp_path / "t.parquet", n_docs=2)
    args = ["quantize", str(src), "--calibration", str(tmp_path / "t.parquet"), "--samples", "2", "--seq-len", "16",
            "--L", "8", "-o", str(tmp_path / out), *flags]
    r = CliRunner().invoke(main, args)
    cfg = tmp_path / out / "config.json"
    return r, (json.loads(cfg.read_text())["quantization_config"] if cfg.exists() else None)


def streamed_matches_in_memory(tmp_path, settings):
    """Quantize a tiny Mixtral (fused experts) calibrated on 3 x 24 tokens with `settings`, streaming into
    tmp_path/q and in memory; check both give the same packed tensors and the folder has no scratch files.
    Returns (src, quantize_model_dir keywords, the streamed state dict, its packed keys, the calibration
    batches, the in-memory state dict, the written quantization_config)."""
    import ccq
    import torch
    from transformers import AutoModelForCausalLM

    from ccq.calibration.data import calibration_batches
    from ccq.eval.synthetic import write_text_dataset
    from ccq.format.source import read_json
    from ccq.models.arch import resolve
    from ccq.tiny import build_tiny_model

    src = build_tiny_model("mixtral", tmp_path / "src")
    data = write_text_dataset(tmp_path / "t.parquet", n_docs=4)
    kw = dict(calibration=data, samples=3, seq_len=24, settings=settings, progress=False)
    ccq.quantize_model_dir(src, tmp_path / "q", **kw)
    assert not list((tmp_path / "q").glob("calib-*"))
    streamed = ccq.load(tmp_path / "q").state_dict()
    packed = [k for k in streamed if k.endswith(".trellis")]
    assert any("experts" in k for k in packed) and any("q_proj" in k for k in packed)
    arch = resolve(read_json(src / "config.json"))
    batches = calibration_batches(data, src, arch.config, 3, 24, arch.adapter)
    model = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ccq.quantize_model(model, calibration=batches, settings=settings)
    mem = model.state_dict()
    for k in packed + [k.replace(".trellis", ".scales") for k in packed]:
        assert torch.equal(streamed[k], mem[k]), k
    return src, kw, streamed, packed, batches, mem, read_json(tmp_path / "q" / "config.json")["quantization_config"]
