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
