"""Reading the next unit and writing the previous shard beside the compute (`Pipeline(overlap=True)`)."""

import json
import threading

import pytest
from click.testing import CliRunner

from ccq.cli import main
from ccq.format.source import SourceCheckpoint
from ccq.format.writer import CheckpointWriter
from ccq.pipeline import quantize_model_dir, units
from pipeline_helpers import WORDS, files

WAIT = 60  # seconds; only reached when the overlap is broken (the run would otherwise deadlock)


@pytest.fixture(scope="module")
def text_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("overlapcal") / "calib.jsonl"
    rows = [{"text": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(24))} for i in range(2)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def untimed(report):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in report["tensors"]]


def test_overlapped_output_is_byte_identical_to_the_serial_order(tiny_ernie, text_jsonl, tmp_path):
    kw = dict(L=8, calibration=text_jsonl, samples=1, seq_len=16, progress=False)
    serial = quantize_model_dir(tiny_ernie, tmp_path / "serial", 2, overlap=False, **kw)
    overlapped = quantize_model_dir(tiny_ernie, tmp_path / "overlap", 2, **kw)
    assert files(tmp_path / "overlap") == files(tmp_path / "serial")
    assert len(files(tmp_path / "serial")) > 4  # shards, index, config, tokenizer files
    assert untimed(overlapped) == untimed(serial)


def test_next_read_and_previous_write_run_during_quantize(tiny_ernie, tmp_path, monkeypatch):
    """Layer 1's weights are read while layer 0 is quantized, and layer 0's shard is written while
    layer 1 is quantized: each side waits for the other's event, which only the threads can set."""
    read_layer1, quantize_layer1 = threading.Event(), threading.Event()
    seen = {"read_layer1_before_quantize0_done": False, "write0_during_quantize1": False, "threads": set()}
    get, write_shard, quantize = SourceCheckpoint.get, CheckpointWriter.write_shard, units.quantize_module

    def watched_get(self, name):
        if ".layers.1." in name:
            seen["threads"].add(("read", threading.current_thread().name.split("_")[0]))
            read_layer1.set()
        return get(self, name)

    def watched_write(self, i, tensors, report):
        if i == 1:  # layer 0's shard
            seen["threads"].add(("write", threading.current_thread().name.split("_")[0]))
            seen["write0_during_quantize1"] = quantize_layer1.wait(WAIT)
        return write_shard(self, i, tensors, report)

    def watched_quantize(model, name, *a, **k):
        if ".layers.0." in name and not seen["read_layer1_before_quantize0_done"]:
            seen["read_layer1_before_quantize0_done"] = read_layer1.wait(WAIT)
        if ".layers.1." in name:
            quantize_layer1.set()
        return quantize(model, name, *a, **k)

    monkeypatch.setattr(SourceCheckpoint, "get", watched_get)
    monkeypatch.setattr(CheckpointWriter, "write_shard", watched_write)
    monkeypatch.setattr(units, "quantize_module", watched_quantize)
    quantize_model_dir(tiny_ernie, tmp_path / "out", 2, L=8, progress=False)
    assert seen["read_layer1_before_quantize0_done"] and seen["write0_during_quantize1"]
    assert seen["threads"] == {("read", "ccq-read"), ("write", "ccq-write")}


def test_serial_order_reads_after_quantize(tiny_ernie, tmp_path, monkeypatch):
    """overlap=False: layer 1 is read only after layer 0 is quantized and written."""
    read_layer1 = threading.Event()
    early = []
    get, quantize = SourceCheckpoint.get, units.quantize_module

    def watched_get(self, name):
        if ".layers.1." in name:
            read_layer1.set()
        return get(self, name)

    def watched_quantize(model, name, *a, **k):
        if ".layers.0." in name:
            early.append(read_layer1.is_set())
        return quantize(model, name, *a, **k)

    monkeypatch.setattr(SourceCheckpoint, "get", watched_get)
    monkeypatch.setattr(units, "quantize_module", watched_quantize)
    quantize_model_dir(tiny_ernie, tmp_path / "out", 2, L=8, progress=False, overlap=False)
    assert early and not any(early) and read_layer1.is_set()


def test_error_in_background_write_is_one_line_and_leaves_nothing(tiny_ernie, tmp_path, monkeypatch):
    write_shard = CheckpointWriter.write_shard
    where = []

    def failing_write(self, i, tensors, report):
        if i == 2:  # layer 1's shard, written while layer 2 runs
            where.append(threading.current_thread().name.split("_")[0])
            raise ValueError(f"cannot write {self.shard_name(i)}: no space left")
        return write_shard(self, i, tensors, report)

    monkeypatch.setattr(CheckpointWriter, "write_shard", failing_write)
    r = CliRunner().invoke(main, ["quantize", str(tiny_ernie), "-o", str(tmp_path / "out"), "--L", "8"])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.replace("\r", "\n").splitlines() if ln.startswith("ccq: error:")]
    assert lines == ["ccq: error: cannot write model-00003-of-00004.safetensors: no space left"], r.output
    assert "Traceback" not in r.output and where == ["ccq-write"]
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.ccq-partial").exists()
