"""Bad input to `ccq eval`: one line naming the problem, exit code 1, no traceback, no report written."""

import shutil

import pytest
from click.testing import CliRunner

from ccq.cli import main
from ccq.eval.synthetic import write_chart_dataset, write_text_dataset
from ccq.tiny import build_tiny_llava


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    model = build_tiny_llava(root / "model")
    bare = root / "bare"  # weights and tokenizer, no processor
    shutil.copytree(model, bare)
    (bare / "processor_config.json").unlink()
    (root / "notes.csv").write_text("a,b\n")
    (root / "broken.parquet").write_bytes(b"not a parquet file")
    no_template = root / "no_template"  # a processor but no chat template
    shutil.copytree(model, no_template)
    (no_template / "chat_template.jinja").unlink()
    return {"root": root, "model": model, "bare": bare, "no_template": no_template, "text": write_text_dataset(root / "text.parquet", 3),
            "charts": write_chart_dataset(root / "charts.parquet", 1), "csv": root / "notes.csv"}


def fails(args, *expected):
    result = CliRunner().invoke(main, ["eval", *map(str, args)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ccq: error: "), result.output
    for e in expected:
        assert e in lines[0]
    return lines[0]


def test_ppl_bad_inputs(files, tmp_path):
    out = tmp_path / "out"
    m, txt = files["model"], files["text"]
    fails(["ppl", "--model", tmp_path / "nope", "--data", txt, "--out", out], "nope", "does not exist")
    fails(["ppl", "--model", m, "--data", tmp_path / "missing.parquet", "--out", out], "missing.parquet")
    fails(["ppl", "--model", m, "--data", files["charts"], "--out", out], "no column 'text'", "charts.parquet")
    fails(["ppl", "--model", m, "--data", txt, "--text-column", "body", "--out", out], "'body'")
    fails(["ppl", "--model", m, "--data", files["csv"], "--out", out], "notes.csv", "unknown dataset type")
    fails(["ppl", "--model", m, "--data", files["root"] / "broken.parquet", "--out", out], "broken.parquet",
          "cannot read as parquet")
    fails(["ppl", "--model", files["root"], "--data", txt, "--out", out], "config.json")
    fails(["ppl", "--model", m, "--reference", tmp_path / "gone", "--data", txt, "--out", out], "gone")
    fails(["ppl", "--model", m, "--data", txt, "--seq-len", 8, "--stride", 9, "--out", out], "--stride")
    assert not out.exists()


def test_chartqa_bad_inputs(files, tmp_path):
    out = tmp_path / "out"
    m, charts = files["model"], files["charts"]
    fails(["chartqa", "--model", m, "--data", files["text"], "--out", out], "missing ChartQA column",
          "image, query, label")
    fails(["chartqa", "--model", m, "--data", tmp_path / "none.parquet", "--out", out], "none.parquet")
    fails(["chartqa", "--model", files["bare"], "--data", charts, "--out", out], "bare", "no processor")
    fails(["chartqa", "--model", m, "--reference", files["bare"], "--data", charts, "--out", out], "no processor")
    fails(["chartqa", "--model", tmp_path / "nope", "--data", charts, "--out", out], "does not exist")
    fails(["chartqa", "--model", files["no_template"], "--data", charts, "--out", out], "no_template",
          "no chat template")
    assert not out.exists()
