"""`ccq plan`: exact packed bytes from a config alone, KV cache, placement, bad input."""

import json
import time

import pytest
from click.testing import CliRunner

from ccq.cli import main
from ccq.codec import packed_nbytes
from ccq.tiny import tiny_ernie_vl_config
from ccq.plan import configs
from ccq.plan.footprint import plan_footprint
from ccq.plan.gpus import parse_gpus, parse_size
from ccq.models.skeleton import quantized_skeleton
from pipeline_helpers import remote_config


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def plan_json(*args):
    r = run_cli("plan", *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    tiny_ernie_vl_config(3).save_pretrained(str(d))
    return d / "config.json"


def test_builtin_28b_totals_and_expert_bytes():
    p2 = plan_json("ernie-4.5-vl-28b-a3b", "--bits", 2, "--context", 32768)
    p4 = plan_json("ernie-4.5-vl-28b-a3b", "--bits", 4, "--context", 0)
    assert p2["total_bytes"] <= 7.9e9 and p4["total_bytes"] <= 15.2e9
    assert sum(p2["groups"].values()) == p2["total_bytes"]
    assert p2["gpus"] == [141 * 10**9] and p2["fits"] and set(p2["devices"]) == {"cuda:0"}  # default: one H200
    # routed experts, independently: 27 sparse layers x text (I=1536) and vision (I=512) stacks of 64
    experts = 27 * sum(packed_nbytes(s, 2) for s in ((64, 3072, 2560), (64, 2560, 1536), (64, 1024, 2560), (64, 2560, 512)))
    assert p2["groups"]["routed_experts"] == p2["quantized_bytes"]["routed_experts"] == experts
    assert p2["groups"]["embeddings"] == 103424 * 2560 * 2  # tied, bf16, stored once
    assert p2["quantized_bytes"]["routers"] == 0
    assert p2["kv_cache_bytes"] == 2 * 28 * 4 * 128 * 2 * 32768
    assert 1.9 < p4["groups"]["routed_experts"] / p2["groups"]["routed_experts"] < 2.0


def test_builtin_424b_placements():
    one = plan_json("ernie-4.5-vl-424b-a47b", "--bits", 2, "--gpus", "1x141GB", "--context", 32768)
    assert one["fits"] and one["offloaded_bytes"] == 0
    assert one["kv_cache_bytes"] == 2 * 54 * 8 * 128 * 2 * 32768
    assert one["devices"]["cuda:0"] >= one["total_bytes"] + one["kv_cache_bytes"]
    assert one["devices"]["cuda:0"] <= 141e9
    four = plan_json("ernie-4.5-vl-424b-a47b", "--bits", 4, "--gpus", "4x80GB")
    assert four["fits"] and all(40e9 < b <= 80e9 for b in four["devices"].values())  # spread evenly
    assert sum(four["devices_kv_cache_bytes"].values()) == four["kv_cache_bytes"]
    no = plan_json("ernie-4.5-vl-424b-a47b", "--bits", 4, "--gpus", "1x141GB")
    assert not no["fits"] and no["offloaded_bytes"] > 0


def test_424b_meta_skeleton_builds_in_seconds():
    config, cls, _ = configs.resolve("ernie-4.5-vl-424b-a47b")
    t = time.perf_counter()
    model, plan = quantized_skeleton(config, cls, 2)
    assert time.perf_counter() - t < 30
    assert len(plan) == 460 and all(p.device.type == "meta" for p in model.parameters())


def test_tiny_config_overrides_and_remote_flavour(tiny_config, tmp_path):
    base = plan_footprint(tiny_config, 2)
    kept = plan_footprint(tiny_config, 2, overrides=[("*vision_tower.*", 16)])
    assert kept["quantized_bytes"]["vision_tower"] == 0 < base["quantized_bytes"]["vision_tower"]
    assert kept["groups"]["vision_tower"] > base["groups"]["vision_tower"]
    assert kept["groups"]["routed_experts"] == base["groups"]["routed_experts"]
    four = plan_footprint(tiny_config, 4)
    assert four["groups"]["routed_experts"] > base["groups"]["routed_experts"]
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps(remote_config(json.loads(tiny_config.read_text()))))
    assert plan_json(remote, "--bits", 2)["groups"]["routed_experts"] == base["groups"]["routed_experts"]


def test_tiny_placement_spreads_over_small_gpus(tiny_config):
    whole = plan_footprint(tiny_config, 2, context=64)
    per_gpu = (whole["total_bytes"] + whole["kv_cache_bytes"]) * 0.6
    p = plan_footprint(tiny_config, 2, context=64, gpus=[int(per_gpu)] * 2)
    assert p["fits"] and all(b > 0 for b in p["devices"].values())
    assert sum(p["devices_kv_cache_bytes"].values()) == p["kv_cache_bytes"]
    tight = plan_footprint(tiny_config, 2, context=64, gpus=[int(per_gpu)] * 2, reserve=int(per_gpu * 0.5))
    assert not tight["fits"]


def test_size_and_gpu_parsing():
    assert parse_gpus("4x80GB") == [80 * 10**9] * 4
    assert parse_gpus("1x141GB+2x24GiB") == [141 * 10**9, 24 * 2**30, 24 * 2**30]
    assert parse_size("512MiB") == 512 * 2**20
    for bad in ("80GB", "4x80", "0x80GB", "4xlots"):
        with pytest.raises(ValueError, match="GPU spec"):
            parse_gpus(bad)


@pytest.mark.parametrize("args, needle", [
    (("ernie-4.5-vl-4b",), "built-in"),
    (("ernie-4.5-vl-28b-a3b", "--gpus", "4y80GB"), "4y80GB"),
    (("ernie-4.5-vl-28b-a3b", "--bits", "5"), "--bits"),
    (("ernie-4.5-vl-28b-a3b", "--reserve", "lots"), "lots"),
])
def test_bad_input_one_line(args, needle):
    r = run_cli("plan", *args)
    assert r.exit_code == 1 and needle in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_unsupported_architecture(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "fancy", "architectures": ["FancyForCausalLM"]}))
    for cmd in (("plan", cfg), ("synth", cfg, "-o", tmp_path / "out")):
        r = run_cli(*cmd)
        assert r.exit_code == 1 and "unsupported architecture" in r.output and str(cfg) in r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
