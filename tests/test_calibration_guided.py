"""Loss-guided Hessians (`guide_groups`): row-group Hessians in the codec, the per-token weights the
measuring pass takes from the 16-bit model's loss gradients, and the pipeline that uses them."""

import pytest
import torch
from torch import nn

import ccq
from ccq.calibration.fisher import group_means
from ccq.calibration.hessian import HessianCapture
from ccq.codec import proxy_loss, quantize_tensor
from ccq.codec.quantizer import row_groups
from ccq.models.settings import QuantSettings
from pipeline_helpers import cli_quantize, crash_then_resume, streamed_matches_in_memory


def _hessian(g, n):
    x = torch.randn(4 * n, n, generator=g)
    return x.T @ x / (4 * n)


def test_row_group_hessians_quantize_each_group_against_its_own():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(60, 48, generator=g)  # 4 tiles of rows, the last padded
    ha, hb = _hessian(g, 48), _hessian(g, 48)
    both = quantize_tensor(w, 2, torch.stack([ha, hb]), L=8)
    only_a, only_b = quantize_tensor(w, 2, ha, L=8), quantize_tensor(w, 2, hb, L=8)
    assert both.trellis.shape == only_a.trellis.shape and both.shape == (60, 48)
    # rows are searched independently given H, and the scales come from the weight alone
    assert torch.equal(both.trellis[:2], only_a.trellis[:2]) and torch.equal(both.trellis[2:], only_b.trellis[2:])
    assert torch.equal(both.scales[:32], only_a.scales[:32]) and torch.equal(both.scales[32:], only_b.scales[32:])
    same = quantize_tensor(w, 2, torch.stack([ha, ha, ha, ha]), L=8)
    assert torch.equal(same.trellis, only_a.trellis) and torch.equal(same.scales, only_a.scales)
    approx = both.dequantize()
    expect = proxy_loss(w[:32], approx[:32], ha) + proxy_loss(w[32:], approx[32:], hb)
    assert proxy_loss(w, approx, torch.stack([ha, hb])) == pytest.approx(expect)
    rw = torch.rand(60, 1, generator=g)
    expect = proxy_loss(w[:32], approx[:32], ha, rw[:32]) + proxy_loss(w[32:], approx[32:], hb, rw[32:])
    assert proxy_loss(w, approx, torch.stack([ha, hb]), rw) == pytest.approx(expect)


def test_row_groups_split_into_whole_tiles_or_fail():
    assert [row_groups(out, 4) for out in (64, 60, 48, 40, 16, 8)] == [4, 4, 3, 3, 1, 1]
    g = torch.Generator().manual_seed(1)
    w, h = torch.randn(64, 32, generator=g), _hessian(g, 32)
    with pytest.raises(ValueError, match="row-group Hessians"):
        quantize_tensor(w, 2, torch.stack([h, h, h]), L=8)  # 4 tiles do not split in 3
    with pytest.raises(ValueError, match="rotate_output"):
        quantize_tensor(w, 2, torch.stack([h, h]), L=8, rotate_output=True)


def test_group_means_average_each_run_of_tiles():
    sq = torch.rand(5, 40)
    m = group_means(sq, 3)  # runs of 16 padded rows: 0-15, 16-31, 32-39 (40-47 padding)
    torch.testing.assert_close(m, torch.stack([sq[:, :16].mean(1), sq[:, 16:32].mean(1), sq[:, 32:].mean(1)], 1))


def test_hessian_capture_weighs_each_token_per_group():
    torch.manual_seed(0)
    lin = nn.Linear(8, 32)
    xs = [torch.randn(1, 5, 8), torch.randn(1, 7, 8), torch.randn(1, 4, 8)]
    guides = {"lin": [torch.rand(5, 2), torch.rand(7, 2)]}  # no weights for the third pass
    with HessianCapture({"lin": lin}, guides) as cap:
        for cap.step, x in enumerate(xs):
            lin(x)
    h = cap.result()["lin"]
    flat = [x.reshape(-1, 8).double() for x in xs]
    weights = [s.double() for s in guides["lin"]] + [torch.ones(4, 2, dtype=torch.float64)]
    for k in range(2):
        expect = sum((x * s[:, k:k + 1]).T @ x for x, s in zip(flat, weights)) / 16
        torch.testing.assert_close(h[k], expect, rtol=1e-9, atol=1e-12)


def test_measure_weights_tokens_by_the_whole_models_loss_gradients():
    """Pipeline.measure's token weights are each token's squared loss gradient at the module's outputs,
    averaged over each row group, as one backward pass through the whole 16-bit model gives them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ccq.calibration.capture import first_output
    from ccq.calibration.fisher import lm_loss
    from ccq.models.policy import quant_plan
    from ccq.pipeline.units import Pipeline

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    batches = [{"input_ids": torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(s))} for s in (1, 2)]
    plan = quant_plan(model, 2, ())
    pipe = Pipeline(model, plan, QuantSettings.of(2, L=8, guide_groups=2), batches=batches)
    with torch.no_grad():
        pipe.measure(set())
    assert set(pipe.guides) == set(plan)
    mods = dict(model.named_modules())
    grads, handles = {n: [] for n in plan}, []

    def keep_grad(n):
        def hook(mod, args, out):
            out.register_hook(lambda g: grads[n].append(g.detach().reshape(-1, g.shape[-1])))
        return hook

    for n in plan:
        handles.append(mods[n].register_forward_hook(keep_grad(n)))
    last = []
    handles.append(model.model.layers[-1].register_forward_hook(lambda m, a, o: last.append(first_output(o))))
    for b in batches:
        model.model(**b)
        lm_loss(model, "model.layers")(last[-1], b["input_ids"]).backward()
    for h in handles:
        h.remove()
    for n in plan:
        groups = row_groups(mods[n].out_features, 2)
        per = [group_means(g.double() ** 2, groups) for g in grads[n]]
        mean = torch.cat(per).mean(0)
        assert len(pipe.guides[n]) == 2 and pipe.guides[n][0].shape == (24, groups)
        for got, ref in zip(pipe.guides[n], per):
            torch.testing.assert_close(got.double(), ref / mean, rtol=1e-3, atol=1e-6)


def test_guided_streaming_matches_in_memory_and_resumes(tmp_path, monkeypatch):
    """The streaming and in-memory quantizers give the same guided bytes (linears in row groups, fused
    experts weighted per token; layer-wise fine-tuning on top), different from the unguided ones; a resumed
    run takes the kept weights."""
    from transformers import AutoModelForCausalLM

    settings = QuantSettings.of(2, L=8, seed=3, guide_groups=2, finetune_steps=3)
    src, kw, streamed, packed, batches, mem, qcfg = streamed_matches_in_memory(tmp_path, settings)
    assert qcfg["guide_groups"] == 2
    plain = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ccq.quantize_model(plain, calibration=batches, settings=QuantSettings.of(2, L=8, seed=3, finetune_steps=3))
    differ = {k.split(".layers.")[1].split(".", 1)[1] for k in packed if not torch.equal(plain.state_dict()[k], mem[k])}
    assert {"self_attn.q_proj.trellis", "mlp.experts.gate_up_proj.trellis"} <= differ

    crash_then_resume(monkeypatch, src, tmp_path / "r", "calib-guides.pt", **kw)
    resumed = ccq.load(tmp_path / "r").state_dict()
    for k in streamed:
        assert torch.equal(resumed[k], streamed[k]), k


def test_cli_guide_groups(tmp_path):
    r, qcfg = cli_quantize(tmp_path, "q", "--guide-groups", "2")
    assert r.exit_code == 0, r.output
    assert qcfg["guide_groups"] == 2
    r, _ = cli_quantize(tmp_path, "bad", "--guide-groups", "-1")
    assert r.exit_code != 0 and "--guide-groups" in r.output and not (tmp_path / "bad").exists()
