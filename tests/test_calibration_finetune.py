"""Layer-wise fine-tuning: lowers the layer's output error, keeps the codes, is deterministic,
and runs inside the streaming quantizer."""

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


def test_streaming_quantize_finetunes_each_layer(tmp_path):
    import json

    from click.testing import CliRunner
    from transformers import LlamaForCausalLM

    import ccq
    from ccq.cli import main
    from pipeline_helpers import WORDS

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    src = tmp_path / "m"
    LlamaForCausalLM(cfg).save_pretrained(str(src))
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>"] + sorted(set(WORDS))[:95])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(str(src))
    g = torch.Generator().manual_seed(0)
    text = "\n".join(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(8))
    (tmp_path / "calib.txt").write_text(text)
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--bits", "2", "--L", "8", "--calibration",
                                  str(tmp_path / "calib.txt"), "--samples", "4", "--seq-len", "32",
                                  "--finetune-steps", "20"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "quantization_report.json").read_text())
    tuned = [e["layer_finetune"] for e in rep["tensors"] if "layers." in e["tensor"]]
    assert len(tuned) == 14 and all(t["loss_after"] <= t["loss_before"] for t in tuned)
    assert any(t["kept"] for t in tuned)
    with torch.no_grad():
        assert torch.isfinite(ccq.load(out)(input_ids=torch.randint(0, 96, (1, 8))).logits).all()
