"""Asymmetric calibration (`asymmetric=True`): each linear quantized toward the 16-bit model's outputs on the
16-bit model's inputs, a layer's modules group by group."""

import pytest
import torch

import ccq
from ccq.calibration.asymmetric import PairedCapture, target_weight
from ccq.models.settings import QuantSettings
from pipeline_helpers import crash_then_resume


def test_target_weight_turns_the_asymmetric_objective_into_the_codecs():
    """E||W x - Q x_q||^2 = ||W' - Q||_H^2 + a constant, for every Q; W' = W when the streams agree."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64)
    xq = x + 0.3 * torch.randn(400, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    h, cross = xq.T @ xq / 400, xq.T @ x / 400
    wt = target_weight(w, h, cross, damp=0.0).double()

    def gaps(q):
        direct = ((x @ w.T - xq @ q.T) ** 2).sum() / 400
        codec = torch.einsum("oi,ij,oj->", wt - q, h, wt - q)
        return float(direct - codec)

    qs = [torch.randn(5, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    assert gaps(qs[0]) == pytest.approx(gaps(qs[1]), rel=1e-4) == pytest.approx(gaps(qs[2]), rel=1e-4)
    same = target_weight(w, h, h, damp=0.01)
    torch.testing.assert_close(same, w.float())
    assert not torch.allclose(target_weight(w, h, cross, damp=0.01), w.float(), atol=1e-2)
    stack = torch.stack([w, 2 * w])  # an expert stack: one H for all, or one each
    torch.testing.assert_close(target_weight(stack, h, cross, 0.01)[1], target_weight(2 * w, h, cross, 0.01))
    hs, cs = torch.stack([h, h / 2]), torch.stack([cross, cross / 2])
    torch.testing.assert_close(target_weight(stack, hs, cs, 0.01)[1], target_weight(2 * w, h / 2, cross / 2, 0.01))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_paired_capture_statistics_and_call_groups():
    """H and G from hooks equal the products of the two streams' module inputs; the groups follow the
    call order and the shared inputs: q/k/v, o, gate/up, down; a module never called comes last."""
    import copy

    from ccq.calibration.asymmetric import call_groups

    model = _tiny_llama()
    layer = model.model.layers[0]
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        for p in layer.parameters():  # the "quantized" layer differs from its 16-bit twin
            p.add_(0.05 * torch.randn_like(p))
    names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    mods, fp_mods = dict(layer.named_modules()), dict(twin.named_modules())
    ids = torch.arange(10)[None]
    pos = model.model.rotary_emb(torch.zeros(1, 10, 32), ids)
    hf, hq = torch.randn(1, 10, 32), torch.randn(1, 10, 32)
    seen = {}

    def record(side, n):
        return lambda m, a: seen.__setitem__((side, n), a[0].reshape(-1, a[0].shape[-1]))

    hooks = [mods[n].register_forward_pre_hook(record("q", n)) for n in names] + \
        [fp_mods[n].register_forward_pre_hook(record("fp", n)) for n in names]
    with PairedCapture({n: mods[n] for n in names}, {n: fp_mods[n] for n in names}) as cap, torch.no_grad():
        cap.run(twin, hf, position_embeddings=pos)
        cap.run(layer, hq, position_embeddings=pos)
    for h in hooks:
        h.remove()
    hs = cap.hessians()
    for n in names:
        xq, x = seen[("q", n)].double(), seen[("fp", n)].double()
        torch.testing.assert_close(hs[n], xq.T @ xq / 10)
        torch.testing.assert_close(cap.cross(n), xq.T @ x / 10)
    extra = torch.nn.Linear(4, 4)
    with torch.no_grad():
        groups = call_groups({**{n: mods[n] for n in reversed(names)}, "unused": extra},
                             lambda: layer(hq, position_embeddings=pos))
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"], ["unused"]]


def test_asymmetric_streaming_matches_in_memory_lowers_the_error_and_resumes(tmp_path, monkeypatch):
    """Streaming and in-memory give the same bytes (linears and fused experts asymmetric, layer-wise tuning
    to the 16-bit stream's outputs); layer 0's q/k/v, whose two streams agree, get
    the plain run's bytes and the modules after them do not; the logits are closer to the 16-bit model's than
    the plain run's; a run killed mid-model resumes bit-exactly from the kept 16-bit stream."""
    from transformers import AutoModelForCausalLM

    from ccq.calibration.data import calibration_batches
    from ccq.eval.synthetic import write_text_dataset
    from ccq.format.source import read_json
    from ccq.models.arch import resolve
    from ccq.tiny import build_tiny_model

    src = build_tiny_model("mixtral", tmp_path / "src")
    data = write_text_dataset(tmp_path / "t.parquet", n_docs=4)
    settings = QuantSettings.of(2, L=8, seed=3, asymmetric=True, finetune_steps=3)
    kw = dict(calibration=data, samples=3, seq_len=24, settings=settings, progress=False)
    ccq.quantize_model_dir(src, tmp_path / "q", **kw)
    assert read_json(tmp_path / "q" / "config.json")["quantization_config"]["asymmetric"] is True
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
    plain = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ccq.quantize_model(plain, calibration=batches, settings=QuantSettings.of(2, L=8, seed=3, finetune_steps=3))
    same = {k.split(".layers.")[1] for k in packed if torch.equal(plain.state_dict()[k], mem[k])}
    assert {f"0.self_attn.{p}_proj.trellis" for p in "qkv"} <= same
    assert "0.self_attn.o_proj.trellis" not in same and "1.self_attn.q_proj.trellis" not in same
    experts0 = {k.split(".layers.")[1] for k in packed if ".layers.0." in k and "experts" in k}
    assert len(experts0) == 2 and not experts0 & same  # gate_up and down, both asymmetric

    ref = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    with torch.no_grad():
        def err(m):
            return sum(float((m(**b).logits - ref(**b).logits).norm() / ref(**b).logits.norm()) for b in batches)
        assert err(model) < err(plain)

    crash_then_resume(monkeypatch, src, tmp_path / "r", "calib-fp-1.pt", **kw)
    resumed = ccq.load(tmp_path / "r").state_dict()
    for k in streamed:
        assert torch.equal(resumed[k], streamed[k]), k


def test_cli_asymmetric(tmp_path):
    import json

    from click.testing import CliRunner

    from ccq.cli import main
    from ccq.eval.synthetic import write_text_dataset
    from ccq.tiny import build_tiny_model

    src = build_tiny_model("mixtral", tmp_path / "src")
    data = write_text_dataset(tmp_path / "t.parquet", n_docs=2)
    args = ["quantize", str(src), "--calibration", str(data), "--samples", "2", "--seq-len", "16", "--L", "8"]
    r = CliRunner().invoke(main, args + ["-o", str(tmp_path / "q"), "--asymmetric"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["asymmetric"] is True
    r = CliRunner().invoke(main, args + ["-o", str(tmp_path / "bad"), "--asymmetric", "--guide-groups", "2"])
    assert r.exit_code != 0 and "cannot be combined" in r.output and not (tmp_path / "bad").exists()
