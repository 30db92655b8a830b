"""The plugin's linear layers as vLLM builds them on each tensor-parallel rank (rank and world
size patched in, no process group): every rank loads its piece through vLLM's weight-loader
calls, and the ranks' outputs, combined as vLLM combines them, equal the unsplit product."""

from unittest import mock

import pytest
import torch
import vllm.model_executor.layers.linear as vllm_linear
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

from ccq import quantize_tensor
from ccq.kernels import qlinear
from ccq.serving.vllm_plugin import CcqConfig

HEAD = 32


def _config(modules):
    return CcqConfig({"quant_method": "ccq", "format_version": 1, "bits": 2, "hadamard_block": 512,
                      "modules": {m: 2 for m in modules}})


def _on_rank(rank, tp, build):
    with mock.patch.object(vllm_linear, "get_tensor_model_parallel_rank", return_value=rank), \
            mock.patch.object(vllm_linear, "get_tensor_model_parallel_world_size", return_value=tp):
        return build()


def _load(layer, qts: dict):
    """What vLLM's loader does with checkpoint tensors `{shard_id: QuantizedTensor}`."""
    params = dict(layer.named_parameters())
    for shard, qt in qts.items():
        for field, t in qt.state_dict().items():
            p = params[field]
            p.weight_loader(p, t, shard) if shard is not None else p.weight_loader(p, t)
    layer.quant_method.process_weights_after_loading(layer)


def test_qkv_with_replicated_kv_heads():
    tp, g = 2, torch.Generator().manual_seed(0)
    q, k, v = (quantize_tensor(torch.randn(n, 64, generator=g), 2, seed=s, L=8)
               for n, s in ((4 * HEAD, 1), (HEAD, 2), (HEAD, 3)))
    x = torch.randn(3, 64, generator=g)
    yq, yk, yv = (qlinear(x, t) for t in (q, k, v))
    for r in range(tp):
        layer = _on_rank(r, tp, lambda: QKVParallelLinear(64, HEAD, 4, 1, bias=False, prefix="m.qkv_proj",
                                                          quant_config=_config(["m.q_proj", "m.k_proj", "m.v_proj"])))
        _load(layer, {"q": q, "k": k, "v": v})
        got = layer.quant_method.apply(layer, x)
        want = torch.cat([yq[:, r * 2 * HEAD:(r + 1) * 2 * HEAD], yk, yv], -1)  # the one KV head on both ranks
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp", [2, 3])
def test_row_parallel_partial_sums(tp):
    g = torch.Generator().manual_seed(1)
    o = quantize_tensor(torch.randn(48, 96, generator=g), 2, seed=4, L=8)
    x = torch.randn(3, 96, generator=g)
    bias = torch.randn(48, generator=g)
    n = 96 // tp
    total = torch.zeros(3, 48)
    for r in range(tp):
        layer = _on_rank(r, tp, lambda: RowParallelLinear(96, 48, bias=False, prefix="m.o_proj",
                                                          quant_config=_config(["m.o_proj"])))
        _load(layer, {None: o})
        total += layer.quant_method.apply(layer, x[:, r * n:(r + 1) * n], bias if r == 0 else None)
    torch.testing.assert_close(total, qlinear(x, o, bias), atol=1e-4, rtol=1e-4)


def test_bad_splits_and_tensors_are_refused():
    with pytest.raises(ValueError, match="m.o_proj: tensor-parallel size 4 splits its 72 input columns into "
                                         "pieces of 18, which cuts a 16x16 tile"):
        _on_rank(0, 4, lambda: RowParallelLinear(72, 48, bias=False, prefix="m.o_proj",
                                                 quant_config=_config(["m.o_proj"])))
    layer = _on_rank(0, 1, lambda: RowParallelLinear(96, 48, bias=False, prefix="m.o_proj",
                                                     quant_config=_config(["m.o_proj"])))
    three_bit = quantize_tensor(torch.randn(48, 96), 3, L=8)
    with pytest.raises(ValueError, match=r"m.o_proj.trellis: checkpoint tensor has shape \(3, 6, 48\), "
                                         r"expected \(3, 6, 32\)"):
        _load(layer, {None: three_bit})
    with pytest.raises(ValueError, match="at different bits"):
        cfg = _config(["m.q_proj", "m.k_proj"])  # v_proj kept 16-bit
        _on_rank(0, 1, lambda: QKVParallelLinear(64, HEAD, 4, 1, bias=False, prefix="m.qkv_proj", quant_config=cfg))
