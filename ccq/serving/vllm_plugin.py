"""vLLM quantization method "ccq": serve a packed checkpoint folder as `ccq quantize` wrote it.

vLLM imports this module through the `vllm.general_plugins` entry point (pyproject.toml)
and calls `register`; nothing else in ccq imports it, so ccq never needs vLLM. The
checkpoint's config.json `quantization_config` (quant_method "ccq") selects the method.

- Linear layers (`CcqLinearMethod`): vLLM fuses q/k/v and gate/up into one layer; each part
  keeps its own packed tensor (own signs, Hadamard block and scales), stacked along the
  tile rows, and runs as its own `ccq.kernels.qlinear`.
- Fused MoE blocks (`CcqMoEMethod`): the packed `experts.gate_up_proj` / `experts.down_proj`
  stacks load as stored (no per-expert split) and run through `ccq.kernels.qmoe`.
- ERNIE-4.5-VL: vLLM's model code reads Baidu's flat config and tensor names; `register` makes
  vLLM read ccq's native config.json in that layout (`ErnieVLServingConfig`) and `CcqConfig`
  renames the checkpoint's tensors for vLLM's loader (`ERNIE_VL_NAMES`). Language model only.
- Tensor parallelism: every rank loads only its piece, cut by `ccq.serving.tensor_parallel`
  (linear layers along tile boundaries, refusing cuts that split a tile; experts by whole
  experts). vLLM's expert parallelism (--enable-expert-parallel) is not supported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, RoutedExperts
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.models.utils import WeightsMapper
from vllm.model_executor.utils import set_weight_attrs

from .. import kernels
from ..codec.tensor import META_FIELDS, FORMAT_VERSION, QuantizedTensor, packed_layout
from ..format.qconfig import QUANT_METHOD, check_quantization_config
from ..models.arch import ernie_vl
from .tensor_parallel import (
    Span,
    block_of,
    check_output_split,
    column_piece,
    expert_piece,
    expert_range,
    row_piece,
    split,
)

# vLLM layer name -> the checkpoint modules it fuses, for models that do not declare them
DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
SUPPORTED_VLLM = ">=0.32,<0.33"
ERNIE_VL = "Ernie4_5_VLMoeForConditionalGeneration"

# ERNIE-4.5-VL checkpoint names (transformers' native model) -> the names vLLM's ERNIE-4.5-VL loader
# reads before its own `hf_to_vllm_mapper` ("model." -> "language_model.model."). Its loader takes
# any tensor whose name holds "q_proj", ..., "up_proj" for a q/k/v/gate/up shard and any holding
# "mlp.experts" for a Baidu per-expert tensor, so the packed expert stacks go straight to this
# plugin's parameters (`w13`, `w2`, named apart from both). The two [1, E] router statistics fill
# the rows of vLLM's one [2, E] tensor (shard id = row). Also renames the config's module names.
ERNIE_VL_NAMES = WeightsMapper(
    orig_to_new_substr={
        "model.language_model.": "model.",
        "model.vision_tower.": "vision_model.",
        **{f".mlp.{m}_moe.experts.{w}.": f".mlp.{m}_experts.routed_experts.{held}."
           for m in ("text", "vision") for w, held in (("gate_up_proj", "w13"), ("down_proj", "w2"))},
        ".mlp.text_moe.experts": ".mlp.text_experts",
        ".mlp.vision_moe.experts": ".mlp.vision_experts",
        ".mlp.text_moe.gate.weight": ".mlp.text_experts_gate.weight",
        ".mlp.vision_moe.gate.weight": ".mlp.vision_experts_gate.weight",
    },
    orig_to_new_stacked={
        ".mlp.text_moe.gate.moe_statics.e_score_correction_bias": (".mlp.e_score_correction_bias", 0),
        ".mlp.vision_moe.gate.moe_statics.e_score_correction_bias": (".mlp.e_score_correction_bias", 1),
    },
)
ERNIE_VL_TOWERS = ("vision_model.", "resampler_model.")
HELD = {"gate_up_proj": "w13", "down_proj": "w2"}  # checkpoint expert stack -> this plugin's holder module


def register() -> None:
    """The `vllm.general_plugins` entry point: make `--quantization ccq` known to vLLM, and let vLLM
    read ERNIE-4.5-VL's native config.json (vLLM 0.32 knows only Baidu's remote-code layout)."""
    from vllm.transformers_utils import config as vllm_hf_config

    register_quantization_config(QUANT_METHOD)(CcqConfig)
    vllm_hf_config._CONFIG_REGISTRY.setdefault(ernie_vl.NATIVE, ErnieVLServingConfig)


class ErnieVLServingConfig(PreTrainedConfig):
    """ERNIE-4.5-VL's native config.json (model_type `ernie4_5_vl_moe`, as ccq writes it) in Baidu's
    flat layout, which vLLM's ERNIE-4.5-VL model code reads (`ernie_vl.remote_config_dict`); M-RoPE
    sections in `rope_parameters` as vLLM detects them."""

    model_type = ernie_vl.NATIVE

    def __init__(self, text_config=None, vision_config=None, **kwargs):
        vision = vision_config or {}
        if text_config is not None:  # config.json as written; without it, the defaults transformers asks for
            text = text_config if isinstance(text_config, dict) else text_config.to_dict()
            flat = ernie_vl.remote_config_dict({**kwargs, "model_type": ernie_vl.NATIVE, "text_config": text,
                                                "vision_config": vision})
            flat.pop("model_type")
            vision = flat.pop("vision_config")
            half = (flat["head_dim"] // 2 - flat["freq_allocation"]) // 2
            flat["rope_parameters"] = {"rope_type": "default", "rope_theta": flat["rope_theta"],
                                       "mrope_section": [half, half, flat["freq_allocation"]]}
            kwargs.update(flat)
        self.vision_config = vision if isinstance(vision, PreTrainedConfig) else PreTrainedConfig(**vision)
        super().__init__(**kwargs)


class CcqConfig(QuantizationConfig):
    """The checkpoint's `quantization_config` (see docs/CHECKPOINT.md)."""

    def __init__(self, qc: dict[str, Any]):
        super().__init__()
        self.qc = check_quantization_config(qc)
        self.modules: dict[str, int] = dict(qc["modules"])
        self.rotate_output = bool(qc.get("rotate_output", False))
        self.hadamard_block = int(qc.get("hadamard_block", 512))
        self.names = WeightsMapper()  # checkpoint -> vLLM loader names of the model family, where they differ
        self.towers: tuple[str, ...] = ()  # vLLM modules this plugin does not serve

    def get_name(self):
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # the Triton kernels; on the CPU the torch reference runs

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CcqConfig":
        return cls(config)

    def maybe_update_config(self, model_name, hf_config=None, revision=None) -> None:
        """Pick the model family's checkpoint names (vLLM calls this with the model's config)."""
        if ERNIE_VL in (getattr(hf_config, "architectures", None) or []):
            self.names, self.towers = ERNIE_VL_NAMES, ERNIE_VL_TOWERS

    def get_checkpoint_weight_mapper(self):
        """ccq writes transformers' in-memory tensor names; where they differ from the on-disk names
        vLLM's model code reads, rename (ERNIE-4.5 keeps its router statistics under the router in
        memory, `mlp.gate.moe_statics.`, and beside it on disk, `mlp.moe_statics.`; ERNIE-4.5-VL:
        `ERNIE_VL_NAMES`)."""
        mapper = QuantizationConfig.get_checkpoint_weight_mapper()
        return mapper | WeightsMapper(orig_to_new_substr={".mlp.gate.moe_statics.": ".mlp.moe_statics."}) | self.names

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Module names in the config are transformers' names: rename them as the checkpoint's
        tensors are renamed, then as the model does."""
        self.modules = hf_to_vllm_mapper.get_rename_mapper().apply_dict(self.names.apply_dict(self.modules))

    def parts_of(self, prefix: str) -> list[str]:
        """Checkpoint module names a vLLM layer is made of (q/k/v for qkv_proj, ...)."""
        base, _, last = prefix.rpartition(".")
        fused = self.packed_modules_mapping.get(last) or (DEFAULT_PACKED.get(last) if prefix not in self.modules else None)
        if not fused:
            return [prefix]
        return [f"{base}.{p}" if base else p for p in fused]

    def get_quant_method(self, layer: nn.Module, prefix: str):
        if prefix.startswith(self.towers):
            _check_towers_off(prefix)
            return UnquantizedLinearMethod() if isinstance(layer, LinearBase) else None
        if isinstance(layer, LinearBase):
            parts = self.parts_of(prefix)
            bits = {p: self.modules.get(p) for p in parts}
            if all(b is None for b in bits.values()):
                return UnquantizedLinearMethod()
            if len(set(bits.values())) > 1:
                raise ValueError(f"{prefix}: vLLM runs {', '.join(parts)} as one layer, but the checkpoint stores them "
                                 f"at different bits {sorted(bits.items())} (16-bit = None); requantize them alike")
            return CcqLinearMethod(self, prefix, parts, next(iter(bits.values())))
        if isinstance(layer, RoutedExperts):
            b = self.modules.get(prefix)
            if b is None and self.towers:
                raise ValueError(f"{prefix}: the checkpoint keeps these experts 16-bit as one fused stack, and vLLM's "
                                 "ERNIE-4.5-VL loader reads only Baidu's per-expert tensors; quantize the experts")
            if b is None:
                return UnquantizedFusedMoEMethod(layer.moe_config)
            return CcqMoEMethod(self, prefix, b, layer.moe_config)
        return None


def _check_towers_off(prefix: str) -> None:
    """vLLM builds the vision tower and resampler in any case, on the meta device and never loaded
    when every image/video limit is 0; ccq serves the language model only."""
    from vllm.config import get_current_vllm_config

    mm = get_current_vllm_config().model_config.get_multimodal_config()
    if any(mm.get_limit_per_prompt(m) for m in ("image", "video")):
        raise ValueError(f"{prefix}: ccq serves ERNIE-4.5-VL's language model only; start vLLM with "
                         "--language-model-only (LLM(..., language_model_only=True))")


# The kernels run as opaque custom ops, so vLLM's torch.compile (fullgraph) and CUDA graphs
# capture them whole instead of tracing the kernels' Python (data-dependent routing, Triton launch).
@torch.library.custom_op("ccq::qlinear", mutates_args=())
def _qlinear_op(x: torch.Tensor, trellis: torch.Tensor, scales: torch.Tensor, signs_in: torch.Tensor,
                signs_out: torch.Tensor | None, meta: list[int]) -> torch.Tensor:
    return kernels.qlinear(x, _packed(trellis, scales, signs_in, signs_out, torch.tensor(meta, dtype=torch.int32)))


@_qlinear_op.register_fake
def _(x, trellis, scales, signs_in, signs_out, meta):
    return x.new_empty(*x.shape[:-1], meta[META_FIELDS.index("out")])


@torch.library.custom_op("ccq::qmoe", mutates_args=())
def _qmoe_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
             gu_trellis: torch.Tensor, gu_scales: torch.Tensor, gu_signs_in: torch.Tensor,
             gu_signs_out: torch.Tensor | None, gu_meta: list[int], dn_trellis: torch.Tensor,
             dn_scales: torch.Tensor, dn_signs_in: torch.Tensor, dn_signs_out: torch.Tensor | None,
             dn_meta: list[int]) -> torch.Tensor:
    gate_up = _packed(gu_trellis, gu_scales, gu_signs_in, gu_signs_out, torch.tensor(gu_meta, dtype=torch.int32))
    down = _packed(dn_trellis, dn_scales, dn_signs_in, dn_signs_out, torch.tensor(dn_meta, dtype=torch.int32))
    return kernels.qmoe(x, topk_ids, topk_weights, gate_up, down, act=F.silu)


@_qmoe_op.register_fake
def _(x, topk_ids, topk_weights, gu_trellis, gu_scales, gu_signs_in, gu_signs_out, gu_meta, dn_trellis,
      dn_scales, dn_signs_in, dn_signs_out, dn_meta):
    return x.new_empty(x.shape[0], dn_meta[META_FIELDS.index("out")])


def _op_args(qt: QuantizedTensor) -> tuple:
    return qt.trellis, qt.scales, qt.signs_in, qt.signs_out, qt.meta.tolist()


def _register(module: nn.Module, name: str, shape, dtype, loader, **attrs) -> None:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    module.register_parameter(name, p)
    set_weight_attrs(p, {"weight_loader": loader, "ccq_field": name, **attrs})


def _check_shape(name: str, t: torch.Tensor, expected) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: checkpoint tensor has shape {tuple(t.shape)}, expected {tuple(expected)} "
                         "(a different model config or bit width?)")


def _check_meta(name: str, meta: torch.Tensor, bits: int, had_in: int) -> None:
    got = dict(zip(META_FIELDS, meta.tolist()))
    if got["version"] != FORMAT_VERSION:
        raise ValueError(f"{name}: packed format version {got['version']} is not supported (this ccq reads {FORMAT_VERSION})")
    if got["bits"] != bits or got["had_in"] != had_in:
        raise ValueError(f"{name}: meta says bits={got['bits']} had_in={got['had_in']}, the quantization_config "
                         f"implies bits={bits} had_in={had_in}")


def _packed(trellis, scales, signs_in, signs_out, meta) -> QuantizedTensor:
    fields = {"trellis": trellis, "scales": scales, "signs_in": signs_in, "meta": meta.cpu()}
    if signs_out is not None:
        fields["signs_out"] = signs_out
    return QuantizedTensor.from_state_dict(fields)


class CcqLinearMethod(LinearMethodBase):
    """One vLLM linear layer made of one or more packed checkpoint tensors."""

    def __init__(self, config: CcqConfig, prefix: str, parts: list[str], bits: int):
        self.config, self.prefix, self.parts, self.bits = config, prefix, parts, bits

    def _geometry(self, layer, input_size: int, output_size: int):
        """(shard ids, full [out, in] of each part, row span of each part, column span)."""
        tp, rank = layer.tp_size, layer.tp_rank
        hb = self.config.hadamard_block
        if isinstance(layer, QKVParallelLinear):
            q = layer.total_num_heads * layer.head_size
            kv_parts = tp // layer.num_kv_head_replicas
            kv_rank = rank // layer.num_kv_head_replicas
            fulls = [q, layer.total_num_kv_heads * layer.head_size, layer.total_num_kv_heads * layer.v_head_size]
            spans = [split(fulls[0], tp, rank, name=self.parts[0])] + [
                split(f, kv_parts, kv_rank, name=n) for f, n in zip(fulls[1:], self.parts[1:])]
            return ["q", "k", "v"], fulls, spans, split(input_size, 1, 0)
        if isinstance(layer, MergedColumnParallelLinear):
            fulls = list(layer.output_sizes)
            spans = [split(f, tp, rank, name=n) for f, n in zip(fulls, self.parts)]
            return list(range(len(fulls))), fulls, spans, split(input_size, 1, 0)
        if isinstance(layer, ColumnParallelLinear):
            return [None], [output_size], [split(output_size, tp, rank, name=self.prefix)], split(input_size, 1, 0)
        if isinstance(layer, RowParallelLinear):
            cols = split(input_size, tp, rank, block_of(input_size, hb), name=self.prefix, what="input columns")
            return [None], [output_size], [split(output_size, 1, 0)], cols
        return [None], [output_size], [split(output_size, 1, 0)], split(input_size, 1, 0)  # replicated

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        ids, fulls, rows, cols = self._geometry(layer, input_size, output_size)
        if len(ids) != len(self.parts) or [r.size for r in rows] != list(output_partition_sizes):
            raise ValueError(f"{self.prefix}: cannot map vLLM's layer ({list(output_partition_sizes)} rows per part) "
                             f"onto the checkpoint modules {self.parts}")
        rot = self.config.rotate_output
        if rot:
            for r, f, n in zip(rows, fulls, self.parts):
                check_output_split(r, block_of(f, self.config.hadamard_block), n)
        offsets = [0]
        for r in rows:
            offsets.append(offsets[-1] + r.stored)
        layer.ccq = {"ids": ids, "fulls": fulls, "rows": rows, "cols": cols, "offsets": offsets,
                     "had_in": block_of(input_size, self.config.hadamard_block)}
        n, k = len(ids), 16 * self.bits

        def loader(param, loaded, shard_id=None):
            self._load(layer, param, loaded, shard_id)

        _register(layer, "trellis", (offsets[-1] // 16, cols.stored // 16, k), torch.int16, loader)
        _register(layer, "scales", (offsets[-1],), torch.float16, loader)
        _register(layer, "signs_in", (n, cols.stored), torch.int8, loader)
        if rot:
            _register(layer, "signs_out", (offsets[-1],), torch.int8, loader)
        _register(layer, "meta", (n, len(META_FIELDS)), torch.int32, loader)

    def _load(self, layer, param, loaded: torch.Tensor, shard_id) -> None:
        g = layer.ccq
        if shard_id is None and len(g["ids"]) > 1:
            raise ValueError(f"{self.prefix}: the checkpoint holds one fused tensor for {self.parts}; ccq packs them apart")
        i = g["ids"].index(shard_id) if shard_id is not None else 0
        field = param.ccq_field
        name = f"{self.parts[i]}.{field}"
        _check_shape(name, loaded, packed_layout((g["fulls"][i], layer.input_size), self.bits,
                                                 self.config.rotate_output)[field][0])
        piece = row_piece(field, column_piece(field, loaded, g["rows"][i]), g["cols"])
        if field == "meta":
            _check_meta(name, loaded, self.bits, g["had_in"])
        if field in ("signs_in", "meta"):
            param.data[i].copy_(piece)
        else:  # this part's rows of the stacked trellis / scales / signs_out
            lo, hi = g["offsets"][i], g["offsets"][i + 1]
            if field == "trellis":
                lo, hi = lo // 16, hi // 16
            param.data.narrow(0, lo, hi - lo).copy_(piece)

    def process_weights_after_loading(self, layer) -> None:
        g = layer.ccq
        parts = []
        for i in range(len(g["ids"])):
            lo, hi = g["offsets"][i], g["offsets"][i + 1]
            so = layer.signs_out[lo:hi] if self.config.rotate_output else None
            parts.append(_packed(layer.trellis[lo // 16:hi // 16], layer.scales[lo:hi], layer.signs_in[i], so,
                                 layer.meta[i]))
        layer.ccq_parts = [_op_args(qt) for qt in parts]  # meta as Python ints: constants to torch.compile

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        cols: Span = layer.ccq["cols"]
        if not cols.whole and (cols.before or cols.after):
            x = F.pad(x, (cols.before, cols.after))
        ys = [_qlinear_op(x, *args) for args in layer.ccq_parts]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        return y if bias is None else y + bias


class CcqMoEMethod(FusedMoEMethodBase):
    """Routed experts as two packed stacks: gate_up [E, 2I, H] (rows: gate, then up) and down [E, H, I].

    Under tensor parallelism each rank holds E/tp whole experts (see `tensor_parallel`) and
    computes the tokens routed to them; vLLM's all-reduce of the MoE output sums the ranks.
    """

    def __init__(self, config: CcqConfig, prefix: str, bits: int, moe):
        super().__init__(moe)
        self.config, self.prefix, self.bits = config, prefix, bits

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        pc = self.moe.moe_parallel_config
        if pc.use_ep:
            raise ValueError(f"{self.prefix}: ccq does not support expert parallelism; use tensor parallelism")
        if self.moe.activation != MoEActivation.SILU or not self.moe.is_act_and_mul:
            raise ValueError(f"{self.prefix}: ccq's fused MoE runs SwiGLU experts only, not {self.moe.activation}")
        self.first, self.count = expert_range(num_experts, pc.tp_size, pc.tp_rank, self.prefix)
        inter = intermediate_size_per_partition * pc.tp_size
        self.had_in = {"gate_up_proj": block_of(hidden_size, self.config.hadamard_block),
                       "down_proj": block_of(inter, self.config.hadamard_block)}
        shapes = {"gate_up_proj": (2 * inter, hidden_size), "down_proj": (hidden_size, inter)}
        rot = self.config.rotate_output
        self.full_layout = {w: packed_layout((num_experts, *s), self.bits, rot) for w, s in shapes.items()}
        for w, s in shapes.items():
            holder = nn.Module()
            for field, (shp, dtype) in packed_layout((self.count, *s), self.bits, rot).items():
                _register(holder, field, shp, dtype, lambda param, loaded, w=w, field=field:
                          self._load(w, field, param, loaded))
            layer.register_module(HELD[w], holder)
        # vLLM's expert loader splits per-expert tensors; ccq's stacks load whole, through this method
        # (models whose loader looks parameters up by name call the parameters' loaders instead)
        layer.load_weights = lambda weights: self._load_weights(layer, weights)
        if self.config.towers:  # ERNIE-4.5-VL: text and vision statistics are rows of one [2, E] tensor
            _set_row_loader(layer.e_score_correction_bias, self.prefix)

    def _load_weights(self, layer, weights):
        for name, loaded in weights:
            w, _, field = name.partition(".")
            holder = getattr(layer, HELD[w], None) if w in HELD else None
            param = getattr(holder, field, None) if holder is not None else None
            if param is None:
                raise ValueError(f"{self.prefix}: unexpected checkpoint tensor {name} for ccq experts")
            self._load(w, field, param, loaded)
            yield f"{HELD[w]}.{field}"

    def _load(self, w: str, field: str, param, loaded: torch.Tensor) -> None:
        """Check one field of a checkpoint stack `w` and copy this rank's experts of it."""
        full = f"{self.prefix}.{w}.{field}"
        _check_shape(full, loaded, self.full_layout[w][field][0])
        if field == "meta":
            _check_meta(full, loaded, self.bits, self.had_in[w])
        param.data.copy_(expert_piece(field, loaded, self.first, self.count))

    def process_weights_after_loading(self, layer) -> None:
        def qt(holder):
            return _packed(holder.trellis, holder.scales, holder.signs_in, getattr(holder, "signs_out", None),
                           holder.meta)

        self.op_args = (*_op_args(qt(layer.w13)), *_op_args(qt(layer.w2)))

    def get_fused_moe_quant_config(self, layer):
        return None

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        if self.count != layer.global_num_experts:  # this rank's experts; others' slots are skipped
            local = topk_ids.long() - self.first
            topk_ids = torch.where((local >= 0) & (local < self.count), local, self.count)
        return _qmoe_op(x, topk_ids, topk_weights, *self.op_args)


def _set_row_loader(stats: torch.Tensor | None, prefix: str) -> None:
    """Give the parameter that `stats` (one modality's router statistics) is a row of a loader that
    fills the row named by the loaded tensor's shard id (set by `ERNIE_VL_NAMES`)."""
    param = stats._base if stats is not None else None
    if not isinstance(param, nn.Parameter) or param.dim() != 2:
        raise ValueError(f"{prefix}: expected the router statistics to be a row of one [modalities, experts] tensor")
    if getattr(param, "weight_loader", None) is not None:
        return

    def load_row(p, loaded: torch.Tensor) -> None:
        row = getattr(loaded, "shard_id", None)
        if row not in range(p.shape[0]) or loaded.numel() != p.shape[1]:
            raise ValueError(f"{prefix}: router statistics of shape {tuple(loaded.shape)} (row {row}) do not fit "
                             f"{tuple(p.shape)}")
        p.data[row].copy_(loaded.reshape(-1))

    set_weight_attrs(param, {"weight_loader": load_row})
