"""Synthetic models of the real shape: random trellis codes, no search.

Any int16 words form a valid tail-biting stream, so random words decode to weights with
the code's bell-shaped distribution; scales of `initializer_range` (0.02 for ERNIE) give
rows of realistic magnitude. What stays 16-bit gets N(0, initializer_range) values (norm
weights 1, biases 0). Used to prove footprints and measure speed without the real weights:
`synth_checkpoint` writes a packed folder through the same writer as `ccq quantize`,
`synth_model` builds the model straight on a device without touching the disk.
"""

from __future__ import annotations

import json
import platform
import zlib
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..codec.config import TrellisConfig
from ..codec.quantizer import incoherence
from ..codec.tensor import QuantizedTensor, make_meta, packed_layout
from ..format.qconfig import make_quantization_config
from ..format.writer import CheckpointWriter
from ..models.policy import packed_names
from ..models.quantize import tensor_seed
from ..models.settings import QuantSettings
from ..models.skeleton import checkpoint_tensors, decoder_layers, packed_buffer_names, quantized_skeleton
from ..version import __version__
from . import configs


def synth_tensor(shape: tuple[int, ...], bits: int, *, seed: int = 0, scale: float = 0.02, device="cpu",
                 rotate_output: bool = False, **options) -> QuantizedTensor:
    """A QuantizedTensor of `shape` with random codes (what `quantize_tensor` would lay out)."""
    cfg = TrellisConfig(bits=bits, rotate_output=rotate_output, **options)
    layout = packed_layout(tuple(shape), bits, rotate_output)
    g = torch.Generator(device=device).manual_seed(seed)
    trellis = torch.randint(-(1 << 15), 1 << 15, layout["trellis"][0], generator=g, device=device, dtype=torch.int16)
    scales = (scale * (0.75 + 0.5 * torch.rand(layout["scales"][0], generator=g, device=device))).half()
    signs_in, had_in, signs_out, had_out = incoherence(layout["scales"][0][-1], layout["signs_in"][0][0], cfg, seed)
    return QuantizedTensor(trellis, scales, signs_in.to(device), None if signs_out is None else signs_out.to(device),
                           make_meta(tuple(shape), cfg, had_in, had_out))


class _Filler:
    """Random values for every checkpoint tensor of a quantized meta model, by name."""

    def __init__(self, model: nn.Module, plan: dict[str, int], config, dtype: torch.dtype, seed: int, options: dict):
        self.tensors = checkpoint_tensors(model, dtype)
        self.packed = packed_buffer_names(model)
        self.dense = packed_names(model, plan)
        self.state = model.state_dict(keep_vars=True)
        tc = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.std = float(getattr(tc, "initializer_range", 0.02))
        self.seed, self.options = seed, options
        self._qt: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, name: str, device) -> torch.Tensor:
        shape, dtype = self.tensors[name]
        if name in self.packed:
            prefix, _, field = name.rpartition(".")
            if prefix not in self._qt:
                shape, bits = self.dense[prefix]
                qt = synth_tensor(shape, bits, seed=tensor_seed(self.seed, prefix),
                                  scale=self.std, device=device, **self.options)
                self._qt = {prefix: qt.state_dict()}  # one packed weight at a time
            return self._qt[prefix][field]
        t = self.state[name]
        if t.device.type != "meta":  # a real persistent buffer: keep its value
            return t.detach().to(device)
        g = torch.Generator(device=device).manual_seed(tensor_seed(self.seed, name))
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias" or "e_score_correction_bias" in name:
            return torch.zeros(shape, dtype=dtype, device=device)
        if leaf == "weight" and len(shape) == 1:  # norm weights
            return torch.ones(shape, dtype=dtype, device=device)
        return (torch.randn(shape, generator=g, device=device) * self.std).to(dtype)


def _prepare(spec, bits, overrides, dtype, seed, options):
    config, cls, where = configs.resolve(spec)
    model, plan = quantized_skeleton(config, cls, bits, overrides)
    return config, model, plan, _Filler(model, plan, config, dtype, seed, options), where


@torch.no_grad()
def synth_model(spec, bits: int | None = 2, *, overrides=(), device="cpu", dtype: torch.dtype = torch.bfloat16,
                seed: int = 0, progress: bool = False, **options) -> nn.Module:
    """The model of CONFIG with random weights, built tensor by tensor on `device`.

    bits None gives the plain 16-bit model of the same shape (the baseline); otherwise the
    model holds ccq modules and `config.quantization_config`, like `ccq.load` returns.
    """
    from accelerate.utils import set_module_tensor_to_device

    config, model, plan, fill, _ = _prepare(spec, bits, overrides, dtype, seed, options)
    for name in tqdm(list(fill.tensors), desc="ccq synth", unit="tensor", disable=not progress):
        set_module_tensor_to_device(model, name, device, value=fill(name, device))
    model.tie_weights()
    model.to(device)  # non-persistent buffers (rotary tables) follow
    if bits is not None:
        model.config.quantization_config = make_quantization_config(
            model, QuantSettings.of(bits, overrides=overrides, seed=seed, **options), plan)
    return model.eval()


@torch.no_grad()
def synth_checkpoint(spec, bits: int, out_dir, *, overrides=(), dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     overwrite: bool = False, progress: bool = True, device="cpu", **options) -> dict:
    """Write a packed checkpoint of CONFIG's real shape with random codes; returns a summary.

    One shard for everything outside the decoder layers, one per decoder layer (as
    `ccq quantize` writes them), so only one layer is in memory at a time. device: where
    the random values are drawn ("cuda" is much faster for the real sizes; the values
    differ from the CPU ones, both are valid).
    """
    import transformers

    settings = QuantSettings.of(bits, overrides=overrides, seed=seed, **options)  # checks bits and options
    config, model, plan, fill, where = _prepare(spec, bits, overrides, dtype, seed, options)
    layers_name, layers = decoder_layers(model)
    units: list[list[str]] = [[] for _ in range(len(layers) + 1)]
    prefix = layers_name + "."
    for name in fill.tensors:
        units[int(name[len(prefix):].split(".", 1)[0]) + 1 if name.startswith(prefix) else 0].append(name)
    run = json.dumps({"synth": where, "bits": bits, "overrides": list(overrides), "seed": seed,
                           "dtype": str(dtype), "options": options}, sort_keys=True, default=str)
    writer = CheckpointWriter(out_dir, len(units), f"synth-{zlib.crc32(run.encode()):08x}", overwrite=overwrite)
    total = 0
    try:
        for i, names in enumerate(tqdm(units, desc="ccq synth", unit="shard", disable=not progress)):
            tensors = {n: fill(n, device) for n in names}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            writer.write_shard(i, tensors, [])
        qc = make_quantization_config(model, settings, plan)
        cfg = json.loads(config.to_json_string(use_diff=False))
        cfg["quantization_config"] = qc
        report = {"bits": bits, "synthetic": True, "source_config": where, "tensors": [], "fallbacks": [],
                  "totals": {"tensor_bytes": total},
                  "versions": {"ccq": __version__, "torch": torch.__version__,
                               "transformers": transformers.__version__, "python": platform.python_version()}}
        writer.finish(cfg, report)
    except BaseException:
        writer.abort()
        raise
    return {"out": str(Path(out_dir)), "bits": bits, "tensor_bytes": total, "shards": len(units),
            "quantized_modules": len(plan)}
