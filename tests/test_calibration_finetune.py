"""Fine-tuning: layer-wise (lowers the layer's output error, keeps the codes, is deterministic, runs
inside the streaming quantizer) and end to end (`ccq finetune` on a packed folder, resumable)."""

import copy

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from ccq.calibration.finetune import finetune_layer
from ccq.models.quantize import quantize_module
from ccq.models.settings import QuantSettings


def _layer_and_data():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=32)
    layer = LlamaDecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        layer.post_attention_layernorm.weight.mul_(torch.linspace(0.5, 2, 48))
    rope = LlamaRotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(4):
        h = torch.randn(1, 16, 48, generator=g)
        pos = torch.arange(16)[None]
        samples.append((h, {"position_embeddings": rope(h, pos)}))
    targets = _outputs(layer, samples)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        quantize_module(layer, name, 2, None, QuantSettings.of(2, L=8))
    return layer, samples, targets


def _outputs(layer, samples):
    with torch.no_grad():
        outs = [layer(h, **kw) for h, kw in samples]
    return [o[0] if isinstance(o, tuple) else o for o in outs]


def _err(layer, samples, targets):
    outs = _outputs(layer, samples)
    return sum(float(((o - t) ** 2).mean() / (t * t).mean()) for o, t in zip(outs, targets)) / len(targets)


def test_finetune_lowers_the_packed_layers_error_and_is_deterministic():
    layer, samples, targets = _layer_and_data()
    twin = copy.deepcopy(layer)
    trellis = layer.mlp.up_proj.trellis.clone()
    flags = [p.requires_grad for p in layer.parameters()]
    before = _err(layer, samples, targets)
    stats = finetune_layer(layer, samples, targets, steps=60, lr=1e-2)
    after = _err(layer, samples, targets)  # through the real QuantLinear forward, fp16 scales
    assert stats["kept"] and abs(stats["loss_before"] - before) < 1e-3 * before
    assert after < 0.9 * before
    assert [p.requires_grad for p in layer.parameters()] == flags
    assert torch.equal(layer.mlp.up_proj.trellis, trellis)  # the codes never move
    finetune_layer(twin, samples, targets, steps=60, lr=1e-2)
    for (n, a), b in zip(layer.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), n


def _tiny_llama_dir(tmp_path):
    """A random 2-layer Llama with a word-level tokenizer, and an 8-line calibration text file."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline_helpers import WORDS

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    src = tmp_path / "m"
    LlamaForCausalLM(cfg).save_pretrained(str(src))
    vocab = {w: i for i, w in enumerate(["<unk>"] + sorted(set(WORDS))[:95])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(str(src))
    g = torch.Generator().manual_seed(0)
    text = "\n".join(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(8))
    (tmp_path / "calib.txt").write_text(text)
    return src, tmp_path / "calib.txt"


def test_streaming_quantize_finetunes_each_layer(tmp_path):
    import json

    from click.testing import CliRunner

    import ccq
    from ccq.cli import main

    src, calib = _tiny_llama_dir(tmp_path)
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--bits", "2", "--L", "8", "--calibration",
                                  str(calib), "--samples", "4", "--seq-len", "32", "--finetune-steps", "20"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "quantization_report.json").read_text())
    tuned = [e["layer_finetune"] for e in rep["tensors"] if "layers." in e["tensor"]]
    assert len(tuned) == 14 and all(t["loss_after"] <= t["loss_before"] for t in tuned)
    assert any(t["kept"] for t in tuned)
    with torch.no_grad():
        assert torch.isfinite(ccq.load(out)(input_ids=torch.randint(0, 96, (1, 8))).logits).all()


def _kl_to(model, reference, batches):
    from ccq.calibration.finetune import model_loss

    with torch.no_grad():
        return sum(float(model_loss(model(**b), reference(**b))) for b in batches) / len(batches)


def test_end_to_end_finetune_of_a_packed_folder(tmp_path):
    """`ccq finetune`: the tuned folder is closer to the 16-bit model (KL on the calibration samples,
    through the packed forward), its codes are the old ones, the run is recorded and repeatable."""
    import json

    from click.testing import CliRunner
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    import ccq
    from ccq.calibration.data import calibration_batches
    from ccq.cli import main
    from ccq.models.arch import resolve
    from ccq.format.source import read_json

    src, calib = _tiny_llama_dir(tmp_path)
    q = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(src), "-o", str(q), "--bits", "2", "--L", "8", "--calibration",
                                  str(calib), "--samples", "4", "--seq-len", "32"])
    assert r.exit_code == 0, r.output
    args = ["--reference", str(src), "--calibration", str(calib), "--samples", "4", "--seq-len", "32",
            "--steps", "24", "--lr", "1e-2"]
    r = CliRunner().invoke(main, ["finetune", str(q), "-o", str(tmp_path / "t"), *args])
    assert r.exit_code == 0, r.output
    assert "loss " in r.output and "24 steps" in r.output
    rec = read_json(tmp_path / "t" / "config.json")["quantization_config"]["finetune"]
    assert rec["kept"] and rec["loss_after"] < 0.8 * rec["loss_before"] and rec["steps"] == 24
    assert json.loads((tmp_path / "t" / "quantization_report.json").read_text())["finetune"]["steps"] == 24
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "t")])
    assert r.exit_code == 0 and "fine-tuned end to end: 24 steps on 4 samples" in r.output, r.output

    ref = LlamaForCausalLM.from_pretrained(str(src)).eval()
    arch = resolve(read_json(q / "config.json"))
    batches = calibration_batches(calib, q, arch.config, 4, 32, arch.adapter)
    before, after = (_kl_to(ccq.load(d).float(), ref, batches) for d in (q, tmp_path / "t"))
    assert after < 0.8 * before
    old = {k: v for f in q.glob("*.safetensors") for k, v in load_file(f).items()}
    new = {k: v for f in (tmp_path / "t").glob("*.safetensors") for k, v in load_file(f).items()}
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in old if k.endswith((".trellis", ".signs_in", ".meta")))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.endswith(".scales"))
    assert any(not torch.equal(old[k], new[k]) for k in old if "norm" in k)
    assert all(old[k].dtype == new[k].dtype for k in old)

    r = CliRunner().invoke(main, ["finetune", str(q), "-o", str(tmp_path / "t2"), *args])
    assert r.exit_code == 0, r.output
    again = {k: v for f in (tmp_path / "t2").glob("*.safetensors") for k, v in load_file(f).items()}
    assert all(torch.equal(new[k], again[k]) for k in new)


def test_end_to_end_finetune_resumes_bit_exactly(tmp_path):
    """Stopped after its state was saved (step 20 of 30), a run given the same state file ends where
    an uninterrupted run ends."""
    from ccq.calibration.finetune import finetune_model
    from transformers import LlamaForCausalLM

    src, _ = _tiny_llama_dir(tmp_path)
    ref = LlamaForCausalLM.from_pretrained(str(src)).eval()
    model = copy.deepcopy(ref)
    for i in range(2):
        for name in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
            quantize_module(model.model.layers[i], name, 2, None, QuantSettings.of(2, L=8))
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 96, (1, 16), generator=g)} for _ in range(3)]
    whole = finetune_model(twin, ref, batches, steps=30, lr=1e-2)

    class Stop(Exception):
        pass

    done = [0]

    def stop_at_25(k):
        done[0] += k
        if done[0] == 25:
            raise Stop

    state = tmp_path / "state.pt"
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        finetune_model(model, ref, batches, steps=30, lr=1e-2, progress=stop_at_25, state_path=state)
    except Stop:
        pass
    assert state.exists()
    for k, v in model.state_dict().items():  # an interrupted run leaves the model as it found it
        assert torch.equal(v, saved[k]), k
    resumed = finetune_model(model, ref, batches, steps=30, lr=1e-2, state_path=state)
    assert resumed == whole
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k


def test_finetune_cli_errors_leave_nothing(tmp_path):
    from click.testing import CliRunner

    from ccq.cli import main

    src, calib = _tiny_llama_dir(tmp_path)
    q = tmp_path / "q"
    assert CliRunner().invoke(main, ["quantize", str(src), "-o", str(q), "--bits", "2", "--L", "8"]).exit_code == 0
    for ref, msg in ((q, "is a ccq-packed checkpoint"), (tmp_path / "nope", "is not a model folder")):
        r = CliRunner().invoke(main, ["finetune", str(q), "-o", str(tmp_path / "t"), "--reference", str(ref),
                                      "--calibration", str(calib), "--samples", "2", "--seq-len", "16"])
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "t").exists() and not (tmp_path / ".t.ccq-partial").exists()
    r = CliRunner().invoke(main, ["finetune", str(src), "-o", str(tmp_path / "t"), "--reference", str(src),
                                  "--calibration", str(calib)])
    assert r.exit_code == 1 and "no ccq quantization_config" in r.output, r.output


def test_finetune_command_defaults_are_the_librarys():
    """The CLI (which imports only click at start-up) repeats the measured end-to-end defaults; they must
    not drift from the library's."""
    from ccq.calibration.finetune import E2E_LR, E2E_STEPS
    from ccq.cli import main

    opts = {p.name: p.default for p in main.commands["finetune"].params}
    assert (opts["steps"], opts["lr"]) == (E2E_STEPS, E2E_LR)
