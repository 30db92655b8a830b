"""Loading checks what it reads: a truncated shard, a packed tensor whose stored shape disagrees with
its trellis words, non-finite scales and an unknown format version give one line naming the file
and the tensor, through `ccq.load`, `from_pretrained` and `ccq eval` alike."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import ccq
from ccq.cli import main
from ccq.eval.synthetic import write_text_dataset
from ccq.pipeline import quantize_model_dir
from ccq.tiny import build_tiny_model

EXPERTS = "model.layers.1.mlp.experts.down_proj"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    src = build_tiny_model("qwen3_moe", root / "src")
    quantize_model_dir(src, root / "q", 2, L=8, progress=False)
    return root / "q"


def shard_of(d, name):
    return d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]


def corrupt(packed, tmp_path, how):
    d = tmp_path / "bad"
    shutil.copytree(packed, d)
    if how == "version":
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"]["format_version"] = 99
        (d / "config.json").write_text(json.dumps(cfg))
        return d, "config.json", "format_version 99"
    shard = shard_of(d, f"{EXPERTS}.meta")
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
        return d, shard.name, "truncated"
    tensors = load_file(shard)
    if how == "shape":
        tensors[f"{EXPERTS}.meta"][7] = 9999  # the stored `out` field no longer matches the trellis words
    else:
        tensors[f"{EXPERTS}.scales"][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    return d, shard.name, EXPERTS


CASES = ["truncated", "shape", "nan", "version"]


@pytest.mark.parametrize("how", CASES)
def test_ccq_load(packed, tmp_path, how):
    d, file, tensor = corrupt(packed, tmp_path, how)
    with pytest.raises(ValueError) as e:
        ccq.load(d)
    assert file in str(e.value) and tensor in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("how", CASES)
def test_from_pretrained(packed, tmp_path, how):
    d, file, tensor = corrupt(packed, tmp_path, how)
    with pytest.raises(ValueError) as e:
        AutoModelForCausalLM.from_pretrained(str(d))
    assert file in str(e.value) and tensor in str(e.value)


@pytest.mark.parametrize("how", CASES)
def test_ccq_eval(packed, tmp_path, how):
    d, file, tensor = corrupt(packed, tmp_path, how)
    data = write_text_dataset(tmp_path / "t.parquet", n_docs=2)
    r = CliRunner().invoke(main, ["eval", "ppl", "--model", str(d), "--data", str(data), "--seq-len", "16",
                                  "--limit", "1", "--out", str(tmp_path / "o")])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("ccq: error:")]
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.output, r.output
    assert file in lines[0] and tensor in lines[0]


def test_intact_checkpoint_loads_both_ways(packed):
    a, b = ccq.load(packed), AutoModelForCausalLM.from_pretrained(str(packed))
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits)
