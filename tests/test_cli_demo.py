import pytest
from click.testing import CliRunner

from ccq.cli import main
from ccq.demo import quantize_and_compare


def test_demo_prints_codec_and_tiny_model_tables():
    r = CliRunner().invoke(main, ["demo", "--size", "32", "--bits", "2", "--L", "8"])
    assert r.exit_code == 0, r.output
    assert "| 2 |" in r.output and "Lloyd-Max" in r.output
    row = [line for line in r.output.splitlines() if line.startswith("| 2 |")][-1]
    ccq_err, rtn_err = (float(c) for c in row.split("|")[3:5])
    assert 0 < ccq_err < rtn_err  # the trellis beats round-to-nearest with groups of 64


def test_demo_rejects_bad_bits():
    r = CliRunner().invoke(main, ["demo", "--bits", "7"])
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_quantize_and_compare_passes_options(tmp_path):
    """The demo's comparison takes quantize_model_dir's options (the fine-tuning measurement in QUALITY.md)."""
    with pytest.raises(ValueError, match="finetune steps must be 0 or more, got -1"):
        quantize_and_compare(tmp_path / "missing", tmp_path / "out", 2, {}, finetune_steps=-1)
