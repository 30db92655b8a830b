"""Generic path: any transformers model made of nn.Linear layers (here a tiny Llama whose
dims are not multiples of 16), through the Python API and through `ccq quantize`."""

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

import ccq
from ccq.cli import main
from ccq.models.quant_modules import QuantLinear


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llama") / "m"
    model.save_pretrained(str(path))
    return path


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_quantize_model_and_save_quantized_roundtrip(llama_dir, tmp_path):
    ref = LlamaForCausalLM.from_pretrained(str(llama_dir)).eval()
    model = LlamaForCausalLM.from_pretrained(str(llama_dir)).eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    ccq.quantize_model(model, bits=4, calibration=[ids], L=8)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert not isinstance(model.lm_head, QuantLinear)  # the output head stays 16-bit
    assert all(e["hessian"] for e in model.ccq_report)
    out = ccq.save_quantized(model, tmp_path / "q", copy_from=llama_dir)
    loaded = ccq.load(out)
    with torch.no_grad():
        r, a, b = ref(input_ids=ids).logits, model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.equal(a, b)
    assert _rel(a, r) < 0.2


def test_cli_streams_a_generic_model(llama_dir, tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(llama_dir), "-o", str(out), "--bits", "3", "--L", "8",
                                  "--module-bits", "*.self_attn.o_proj=16"])
    assert r.exit_code == 0, r.output
    assert len(list(out.glob("model-*.safetensors"))) == 3  # outside the layers + 2 decoder layers
    m = ccq.load(out)
    assert isinstance(m.model.layers[1].self_attn.q_proj, QuantLinear) and m.model.layers[1].self_attn.q_proj.bits == 3
    assert isinstance(m.model.layers[1].self_attn.o_proj, torch.nn.Linear)
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=ids).logits).all()


def test_quantize_model_calibrates_a_bert_style_encoder():
    """Encoders keep their layers in `encoder.layer` and take the attention mask by position: every
    layer is still calibrated (Hessians for all its Linears) and beats the data-free search."""
    import copy

    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    ref = BertModel(cfg).eval()
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        want = ref(**batch).last_hidden_state

    def err(model):
        with torch.no_grad():
            return float((model(**batch).last_hidden_state - want).norm() / want.norm())

    calibrated = ccq.quantize_model(copy.deepcopy(ref), 2, [batch], L=8, overrides=[("pooler.*", 16)])
    free = ccq.quantize_model(copy.deepcopy(ref), 2, None, L=8, overrides=[("pooler.*", 16)])
    assert len(calibrated.ccq_report) == 12 and all(e["hessian"] for e in calibrated.ccq_report)
    assert err(calibrated) < err(free)
