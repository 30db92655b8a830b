"""Bits per module for a target bpw: the knapsack, the sampled cost, and quantize_model(target_bpw=...)."""

import itertools

import pytest
import torch

from ccq.calibration.allocate import allocate, choose_bits, measure_costs
from ccq.codec import proxy_loss, quantize_tensor
from ccq.models.settings import QuantSettings


def _brute(costs, sizes, budget):
    mods = list(costs)
    best = None
    for bits in itertools.product(*(list(costs[m]) for m in mods)):
        if sum(sizes[m][b] for m, b in zip(mods, bits)) <= budget:
            c = sum(costs[m][b] for m, b in zip(mods, bits))
            best = c if best is None else min(best, c)
    return best


def _convex_instance(g, n):
    """Random modules whose cost falls by shrinking steps per extra byte (as distortion-rate curves do)."""
    costs, sizes = {}, {}
    for i in range(n):
        numel = int(torch.randint(1, 20, (1,), generator=g)) * 64
        scale = float(torch.rand(1, generator=g)) * 10 + 0.1
        costs[f"m{i}"] = {b: scale * numel * 4.0 ** -b for b in (2, 3, 4)}
        sizes[f"m{i}"] = {b: numel * b // 8 + 16 for b in (2, 3, 4)}
    return costs, sizes


def test_choose_bits_is_within_one_upgrade_of_the_optimum():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        costs, sizes = _convex_instance(g, 5)
        lo = sum(min(s.values()) for s in sizes.values())
        hi = sum(max(s.values()) for s in sizes.values())
        budget = lo + int(float(torch.rand(1, generator=g)) * (hi - lo))
        choice = choose_bits(costs, sizes, budget)
        used = sum(sizes[m][b] for m, b in choice.items())
        assert used <= budget
        got = sum(costs[m][b] for m, b in choice.items())
        best = _brute(costs, sizes, budget)
        step = max(c[b] - c[b + 1] for c in costs.values() for b in (2, 3))
        assert best - 1e-9 <= got <= best + step  # the LP-relaxation bound of the greedy knapsack


def test_choose_bits_edges():
    costs = {"a": {2: 10.0, 3: 3.0, 4: 1.0}, "b": {2: 1.0, 3: 0.5, 4: 0.4}}
    sizes = {"a": {2: 20, 3: 30, 4: 40}, "b": {2: 20, 3: 30, 4: 40}}
    assert choose_bits(costs, sizes, 40) == {"a": 2, "b": 2}
    assert choose_bits(costs, sizes, 50) == {"a": 3, "b": 2}  # the bigger drop first
    assert choose_bits(costs, sizes, 80) == {"a": 4, "b": 4}
    with pytest.raises(ValueError, match="below the smallest packed size"):
        choose_bits(costs, sizes, 39)
    with pytest.raises(ValueError, match="positive"):
        QuantSettings.of(2, target_bpw=float("nan"))


def test_sampled_cost_tracks_the_full_proxy_loss():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(192, 32, generator=g)
    x = torch.randn(256, 32, generator=g) * torch.linspace(0.1, 3, 32)
    h = x.T @ x / 256
    est = measure_costs(w, h, QuantSettings.of(2, L=8), (2, 3), rows=48)
    for b in (2, 3):
        full = proxy_loss(w, quantize_tensor(w, b, h, L=8).dequantize(), h)
        assert est[b] == pytest.approx(full, rel=0.25)
    assert est[2] > 2.5 * est[3]


def test_allocate_spends_bits_where_the_cost_is():
    g = torch.Generator().manual_seed(2)
    weights = {"loud": [(torch.randn(64, 64, generator=g) * 10, None)],
               "quiet": [(torch.randn(64, 64, generator=g) * 0.1, None)]}
    chosen, costs = allocate(weights, QuantSettings.of(2, L=8, target_bpw=3.0), candidates=(2, 3), rows=16)
    assert chosen == {"loud": 3, "quiet": 2}
    assert costs["loud"][2] > costs["loud"][3]
    with pytest.raises(ValueError, match="below the smallest size"):
        allocate(weights, QuantSettings.of(2, L=8, target_bpw=1.0), candidates=(2, 3), rows=16)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama") / "m"
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
    return path


def _bpw(report):
    return sum(e["bytes"] for e in report) * 8 / sum(torch.Size(e["shape"]).numel() for e in report)


def test_quantize_model_meets_the_target_and_mixes_bits(llama_dir):
    import ccq
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(llama_dir)).eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    ccq.quantize_model(model, calibration=[ids], target_bpw=3.6, overrides=[("*.o_proj", 16)], L=8)
    bits = {e["tensor"]: e["bits"] for e in model.ccq_report}
    assert len(set(bits.values())) >= 2
    assert not any(n.endswith("o_proj") for n in bits)
    assert 3.2 < _bpw(model.ccq_report) <= 3.6
    qc = model.config.quantization_config
    assert qc["target_bpw"] == 3.6 and qc["modules"] == bits


def test_cli_target_bpw_streams_and_inspect_shows_the_mix(llama_dir, tmp_path):
    from click.testing import CliRunner

    from ccq.cli import main
    from ccq.format.inspect import summarize

    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(llama_dir), "-o", str(out), "--target-bpw", "3.5", "--L", "8",
                                  "--module-bits", "*.layers.0.mlp.down_proj=4"])
    assert r.exit_code == 0, r.output
    s = summarize(out)
    assert s["target_bpw"] == 3.5 and len(s["modules_by_bits"]) >= 2
    import json
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules"]["model.layers.0.mlp.down_proj"] == 4
    r = CliRunner().invoke(main, ["quantize", str(llama_dir), "-o", str(tmp_path / "bad"), "--target-bpw", "1.5"])
    assert r.exit_code != 0 and "below the smallest size" in r.output
    assert not (tmp_path / "bad").exists()


def test_plan_target_bpw_shows_the_bigger_size(llama_dir):
    import json

    from click.testing import CliRunner

    from ccq.cli import main

    def total(*extra):
        r = CliRunner().invoke(main, ["plan", str(llama_dir), "--json", *extra])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    base, mixed, four = total(), total("--target-bpw", "3.5"), total("--bits", "4")
    assert base["total_bytes"] < mixed["total_bytes"] < four["total_bytes"]
    r = CliRunner().invoke(main, ["plan", str(llama_dir), "--target-bpw", "1"])
    assert r.exit_code != 0 and "below the smallest size" in r.output


def test_row_weights_weight_each_output_rows_term():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 32, generator=g)
    x = torch.randn(128, 32, generator=g)
    h = x.T @ x / 128
    s = QuantSettings.of(2, L=8)
    plain = measure_costs(w, h, s, (2,), rows=24)[2]
    assert measure_costs(w, h, s, (2,), rows=24, row_weight=torch.ones(24))[2] == pytest.approx(plain)
    assert measure_costs(w, h, s, (2,), rows=24, row_weight=3.0)[2] == pytest.approx(3 * plain)
    f = torch.zeros(24)
    f[5] = 2.0
    d = (w - quantize_tensor(w, 2, h, L=8).dequantize()).double()
    assert measure_costs(w, h, s, (2,), rows=24, row_weight=f)[2] == pytest.approx(2 * float(d[5] @ h.double() @ d[5]))


def test_measure_takes_the_whole_model_backwards_fisher_layer_by_layer(llama_dir, monkeypatch):
    """Pipeline.measure's reverse pass, each layer run again from its kept inputs, gives every module's
    outputs' Fisher as one backward pass of the next-token loss through the whole model does."""
    from transformers import LlamaForCausalLM

    from ccq.calibration import allocate as alloc
    from ccq.calibration.capture import first_output
    from ccq.calibration.fisher import OutputFisher, lm_loss
    from ccq.models.policy import quant_plan
    from ccq.pipeline import units
    from ccq.pipeline.units import Pipeline

    model = LlamaForCausalLM.from_pretrained(str(llama_dir)).eval()
    batches = [{"input_ids": torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(s))} for s in (1, 2)]
    settings = QuantSettings.of(2, L=8, target_bpw=2.5)
    plan = quant_plan(model, 2, ())
    seen, real = {}, alloc.weight_costs
    monkeypatch.setattr(alloc, "weight_costs", lambda m, n, h, s, fisher=None: seen.update(fisher or {}) or real(m, n, h, s, fisher))
    mods = dict(model.named_modules())

    def whole_model(batches):
        last = []
        hook = model.model.layers[-1].register_forward_hook(lambda m, a, o: last.append(first_output(o)))
        with OutputFisher({n: mods[n] for n in plan}) as fc:
            for b in batches:
                model.model(**b)
                lm_loss(model, "model.layers")(last[-1], b["input_ids"]).backward()
        hook.remove()
        return fc.result()

    with torch.no_grad():
        costs = Pipeline(model, plan, settings, batches=batches).measure(set(plan))
    assert set(costs) == {f"{n}.0" for n in plan}
    ref = whole_model(batches)
    assert set(ref) == set(plan) and set(seen) == set(plan)
    for k in plan:
        assert float(ref[k].min()) > 0
        torch.testing.assert_close(seen[k], ref[k], rtol=1e-4, atol=1e-9)
    # kept inputs past MEASURE_BYTES: the first sample only
    monkeypatch.setattr(units, "MEASURE_BYTES", 1)
    with torch.no_grad():
        Pipeline(model, plan, settings, batches=batches).measure(set(plan))
    ref = whole_model(batches[:1])
    for k in plan:
        torch.testing.assert_close(seen[k], ref[k], rtol=1e-4, atol=1e-9)
