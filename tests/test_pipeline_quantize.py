"""End to end: `ccq quantize` on tiny ERNIE-4.5-VL models -> packed folder -> ccq.load -> forward."""

import json
import random

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer, Ernie4_5_VLMoeForConditionalGeneration

import ccq
from ccq.cli import main
from ccq.models.baseline import rtn_model
from ccq.models.quant_modules import QuantLinear, QuantMoeExperts
from ccq.tiny import tiny_ernie_image_inputs
from pipeline_helpers import WORDS


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def packed(tiny_ernie, calib_parquet, tmp_path_factory):
    out = {}
    for bits in (2, 4):
        d = tmp_path_factory.mktemp("packed") / f"q{bits}"
        # L=8 leaves a 4-bit trellis only 4 bits of memory (barely more than scalar rounding): 4 bits use L=12
        r = run_cli("quantize", tiny_ernie, "-o", d, "--bits", bits, "--L", 8 if bits == 2 else 12,
                    "--calibration", calib_parquet,
                    "--samples", 4, "--seq-len", 24)
        assert r.exit_code == 0, r.output
        out[bits] = d
    return out


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("bits", [2, 4])
def test_quantized_logits_beat_rtn_g64(packed, tiny_ernie, bits):
    ref = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(str(tiny_ernie)).eval()
    q = ccq.load(packed[bits])
    assert isinstance(q.model.language_model.layers[1].mlp.text_moe.experts, QuantMoeExperts)
    assert isinstance(q.model.language_model.layers[1].self_attn.q_proj, QuantLinear)
    assert isinstance(q.model.vision_tower.blocks[0].attn.qkv, QuantLinear)
    plan = json.loads((packed[bits] / "config.json").read_text())["quantization_config"]["modules"]
    rtn = rtn_model(Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(str(tiny_ernie)).eval(), plan)
    words = " ".join(random.Random(3).choices(WORDS, k=40))
    text = {"input_ids": AutoTokenizer.from_pretrained(str(tiny_ernie))(words, return_tensors="pt")["input_ids"]}
    img = tiny_ernie_image_inputs(tiny_ernie)
    with torch.no_grad():
        for batch in (text, img):
            r, a, b = (m(**batch).logits for m in (ref, q, rtn))
            assert torch.isfinite(a).all()
            assert rel(a, r) < rel(b, r), (bits, "image" if "pixel_values" in batch else "text", rel(a, r), rel(b, r))


def test_report_inspect_and_modality_statistics(packed):
    rep = json.loads((packed[2] / "quantization_report.json").read_text())
    vision = [e for e in rep["tensors"] if "vision_moe.experts" in e["tensor"] or "vision_tower" in e["tensor"]]
    assert vision and all(e["hessian"] for e in vision)  # image rows reached the vision experts and tower
    assert rep["fallbacks"] == []
    assert rep["totals"]["by_group"]["routed_experts"]["tensors"] == 8  # 2 MoE layers x (text, vision) x (gate_up, down)
    r = run_cli("inspect", packed[2])
    assert r.exit_code == 0, r.output
    assert "routed_experts" in r.output and "vision_tower" in r.output and "data-free fallbacks: 0" in r.output
    assert "ccq 2-bit" in r.output


def test_copied_files_and_layout(packed, tiny_ernie):
    names = {p.name for p in packed[2].iterdir()}
    assert {"tokenizer.json", "preprocessor_config.json", "config.json", "model.safetensors.index.json",
            "quantization_report.json", "model-00001-of-00004.safetensors"} <= names
    assert not any(n.endswith(".tmp") for n in names)
    index = json.loads((packed[2] / "model.safetensors.index.json").read_text())["weight_map"]
    x = "model.language_model.layers.1.mlp.text_moe.experts.gate_up_proj"
    assert {f"{x}.trellis", f"{x}.scales", f"{x}.signs_in", f"{x}.meta"} <= set(index)
    assert "model.language_model.layers.1.self_attn.q_proj.trellis" in index
    assert "model.language_model.layers.1.mlp.text_moe.gate.weight" in index  # router stays 16-bit
    assert "lm_head.weight" not in index  # tied


def test_refuses_non_empty_output(tiny_ernie, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("quantize", tiny_ernie, "-o", out, "--bits", 2, "--L", 8)
    assert r.exit_code == 1 and "--overwrite" in r.output
    assert (out / "keep.txt").read_text() == "mine"


def test_from_pretrained_loads_the_same_model(packed):
    from transformers import AutoModelForImageTextToText

    a = ccq.load(packed[2])
    b = AutoModelForImageTextToText.from_pretrained(str(packed[2]))
    assert isinstance(b.model.language_model.layers[2].mlp.vision_moe.experts, QuantMoeExperts)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ids = torch.randint(1, 25, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_transformers_save_pretrained_roundtrip(packed, tmp_path):
    from transformers import AutoModelForImageTextToText

    b = AutoModelForImageTextToText.from_pretrained(str(packed[2]))
    b.save_pretrained(str(tmp_path / "resaved"))
    c = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "resaved"))
    assert isinstance(c.model.language_model.layers[1].mlp.text_moe.experts, QuantMoeExperts)
    ids = torch.randint(1, 25, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(b(input_ids=ids).logits, c(input_ids=ids).logits)


def test_load_dtype_and_device_map_keep_packed_fields(packed):
    m = ccq.load(packed[4], dtype=torch.float32, device_map="auto")
    e = m.model.language_model.layers[1].mlp.text_moe.experts
    assert e.gate_up_proj.scales.dtype == torch.float16 and e.down_proj.trellis.dtype == torch.int16
    assert m.model.language_model.embed_tokens.weight.dtype == torch.float32
    assert m.lm_head.weight is m.model.language_model.embed_tokens.weight
    with torch.no_grad():
        assert m(input_ids=torch.randint(1, 25, (1, 8))).logits.dtype == torch.float32


def test_end_to_end_finetune_on_text_and_images(packed, tiny_ernie, calib_parquet, tmp_path):
    """`ccq finetune` on the MoE vision-language family: image+text samples, gradients through the
    quantized experts; the tuned folder loads and its calibration loss went down."""
    r = run_cli("finetune", packed[2], "-o", tmp_path / "t", "--reference", tiny_ernie, "--calibration", calib_parquet,
                "--samples", 4, "--seq-len", 24, "--steps", 8, "--lr", 3e-3)
    assert r.exit_code == 0, r.output
    ft = json.loads((tmp_path / "t" / "config.json").read_text())["quantization_config"]["finetune"]
    assert ft["kept"] and ft["loss_after"] < ft["loss_before"] and ft["samples"] == 4
    with torch.no_grad():
        assert torch.isfinite(ccq.load(tmp_path / "t")(**tiny_ernie_image_inputs(tiny_ernie)).logits).all()


def test_target_bpw_costs_every_module_with_the_loss_fisher_on_text_and_images(tiny_ernie, calib_parquet, tmp_path,
                                                                                 monkeypatch):
    """ERNIE-4.5-VL, text and image calibration: the allocator's pre-pass costs every module (text and
    vision experts, attention, vision tower, resampler) with its outputs' Fisher, and the run meets the target."""
    from ccq.calibration import allocate as alloc

    fisher, measured, real = {}, [], alloc.weight_costs

    def spy(model, names, hessians, settings, f=None):
        fisher.update(f or {})
        measured.extend(names)
        return real(model, names, hessians, settings, f)

    monkeypatch.setattr(alloc, "weight_costs", spy)
    out = tmp_path / "q"
    r = run_cli("quantize", tiny_ernie, "-o", out, "--target-bpw", 2.6, "--L", 8, "--calibration", calib_parquet,
                "--samples", 8, "--seq-len", 64)
    assert r.exit_code == 0, r.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(measured) == sorted(qc["modules"]) and len(set(qc["modules"].values())) >= 2
    for part in ("text_moe.experts.down_proj", "vision_moe.experts.down_proj", "self_attn.o_proj", "vision_tower", "resampler"):
        hits = [v for k, v in fisher.items() if part in k]
        assert hits and all(float(torch.as_tensor(v).min()) > 0 for v in hits), part
