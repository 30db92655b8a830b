"""`ccq plan --tp N`: what each GPU holds when vLLM splits the packed model N ways.

Follows vLLM's layout: attention q/k/v, MLP gate/up, vision qkv/fc1 are column-parallel;
o_proj, down_proj, vision proj/fc2 row-parallel; fused experts are split by whole experts
(as the ccq plugin does); embeddings and the output head split the vocabulary; everything else (norms,
routers, resampler) is replicated. Packed pieces are sized by `ccq.serving.tensor_parallel`
(the cuts the vLLM plugin loads), so a size that cuts a tile is refused here too.
"""

from __future__ import annotations

from torch import nn

from ..codec.config import TrellisConfig
from ..models.quant_modules import PackedWeight, QuantExperts, QuantLinear
from ..models.skeleton import checkpoint_tensors, nbytes, packed_buffer_names
from ..serving.tensor_parallel import block_of, expert_range, rank_nbytes, split

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv", "fc1")
ROW = ("o_proj", "down_proj", "proj", "fc2")
KV = ("k_proj", "v_proj")


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_heads(config, tp: int) -> None:
    """vLLM's own rule: tp divides the attention heads, and divides or is a multiple of the KV heads."""
    tc = _text(config)
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    if heads % tp:
        raise ValueError(f"tensor-parallel size {tp} does not divide the {heads} attention heads")
    if kv % tp and tp % kv:
        raise ValueError(f"tensor-parallel size {tp} neither divides nor is a multiple of the {kv} KV heads")


def _linear_bytes(name: str, mod: QuantLinear, tp: int, rank: int, kv_heads: int, hb: int) -> int:
    shape, last = (mod.out_features, mod.in_features), name.rsplit(".", 1)[-1]
    is_text_kv = last in KV and ".self_attn." in f".{name}"
    if last in COLUMN:
        parts = min(tp, kv_heads) if is_text_kv else tp
        index = rank * parts // tp
        return rank_nbytes("column", shape, mod.bits, split(shape[0], parts, index, name=name))
    if last in ROW:
        return rank_nbytes("row", shape, mod.bits,
                           split(shape[1], tp, rank, block_of(shape[1], hb), name=name, what="input columns"))
    return rank_nbytes("replicated", shape, mod.bits, split(shape[0], 1, 0))


def _experts_bytes(name: str, mod: QuantExperts, tp: int, rank: int) -> int:
    """E/tp experts' codes and scales; the sign vectors and meta are shared by all experts."""
    total = 0
    for packed in mod.children():
        if isinstance(packed, PackedWeight):
            e = packed.trellis.shape[0]
            _, n = expert_range(e, tp, rank, name)
            for field, t in packed.named_buffers(recurse=False):
                b = nbytes(tuple(t.shape), t.dtype)
                total += b * n // e if field in ("trellis", "scales") else b
    return total


def tp_footprint(model: nn.Module, config, tp: int, dtype, kv_cache_bytes: int,
                 hadamard_block: int = TrellisConfig.hadamard_block) -> dict:
    """Per-GPU bytes of the quantized meta `model` split `tp` ways (the largest rank's)."""
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    check_heads(config, tp)
    tc = _text(config)
    kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab_split = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding) or (head is not None and m is head)}
    packed_owners = {}
    for n, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantExperts)):
            packed_owners[n] = m
    packed = packed_buffer_names(model)
    shared = split_16bit = 0
    for name, (shape, dt) in checkpoint_tensors(model, dtype).items():
        if name in packed:
            continue
        module = name.rpartition(".")[0]
        if module in vocab_split or (module not in packed_owners and module.rsplit(".", 1)[-1] in COLUMN + ROW):
            split_16bit += nbytes(shape, dt)
        else:
            shared += nbytes(shape, dt)
    per_rank = []
    for rank in range(tp):
        b = 0
        for n, m in packed_owners.items():
            b += _experts_bytes(n, m, tp, rank) if isinstance(m, QuantExperts) \
                else _linear_bytes(n, m, tp, rank, kv_heads, hadamard_block)
        per_rank.append(b)
    packed_total = sum(_experts_bytes(n, m, 1, 0) if isinstance(m, QuantExperts)
                       else _linear_bytes(n, m, 1, 0, kv_heads, hadamard_block) for n, m in packed_owners.items())
    per_gpu = max(per_rank) + -(-split_16bit // tp) + shared
    return {
        "tp": tp,
        "per_gpu_bytes": per_gpu,
        "per_gpu_packed_bytes": max(per_rank),
        "packed_overlap_bytes": max(per_rank) - -(-packed_total // tp),  # input Hadamard blocks kept by two ranks
        "per_gpu_kv_cache_bytes": kv_cache_bytes * max(kv_heads // tp, 1) // kv_heads,
    }
