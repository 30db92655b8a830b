"""Asymmetric calibration (`asymmetric=True`): each linear quantized toward the 16-bit model's outputs on the
16-bit model's inputs, a layer's modules group by group."""

import pytest
import torch

import ccq
from ccq.calibration.asymmetric import PairedCapture, target_weight
from ccq.models.settings import QuantSettings
from pipeline_helpers import cli_quantize, crash_then_resume, streamed_matches_in_memory


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

    settings = QuantSettings.of(2, L=8, seed=3, asymmetric=True, finetune_steps=3)
    src, kw, streamed, packed, batches, mem, qcfg = streamed_matches_in_memory(tmp_path, settings)
    assert qcfg["asymmetric"] is True
    plain = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ccq.quantize_model(plain, calibration=batches,
                        settings=QuantSettings.of(2, L=8, seed=3, finetune_steps=3, asymmetric=False))
    same = {k.split(".layers.")[1] for k in packed if torch.equal(plain.state_dict()[k], mem[k])}
    assert {f"0.self_attn.{p}_proj.trellis" for p in "qkv"} <= same
    assert "0.self_attn.o_proj.trellis" not in same and "1.self_attn.q_proj.trellis" not in same
    experts0 = {k.split(".layers.")[1] for k in packed if ".layers.0." in k and "experts" in k}
    assert len(experts0) == 2 and not experts0 & same  # gate_up and down, both asymmetric

    ref = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    with torch.no_grad():
        def err(m):
            return sum(float((m(**b).logits - ref(**b).logits).norm() / ref(**b).logits.norm()) for b in batches)
        assert err(ccq.load(tmp_path / "q").eval()) < err(plain)

    crash_then_resume(monkeypatch, src, tmp_path / "r", "calib-fp-1.pt", **kw)
    resumed = ccq.load(tmp_path / "r").state_dict()
    for k in streamed:
        assert torch.equal(resumed[k], streamed[k]), k


def test_asymmetric_is_the_default_unless_guided():
    assert QuantSettings.of(2).asymmetric and not QuantSettings.of(2, asymmetric=False).asymmetric
    assert not QuantSettings.of(2, guide_groups=2).asymmetric
    assert not QuantSettings.from_dict(QuantSettings.of(2, guide_groups=2).to_dict()).asymmetric
    assert not QuantSettings.from_dict({"bits": 2}).asymmetric  # configs written before it existed
    with pytest.raises(ValueError, match="turn it off"):
        QuantSettings.of(2, guide_groups=2, asymmetric=True)


def test_cli_asymmetric(tmp_path):
    r, qcfg = cli_quantize(tmp_path, "q")
    assert r.exit_code == 0, r.output
    assert qcfg["asymmetric"] is True
    r, qcfg = cli_quantize(tmp_path, "plain", "--no-asymmetric")
    assert r.exit_code == 0, r.output
    assert qcfg["asymmetric"] is False
    r, _ = cli_quantize(tmp_path, "bad", "--asymmetric", "--guide-groups", "2")
    assert r.exit_code != 0 and "cannot be combined" in r.output and not (tmp_path / "bad").exists()
