"""`quantize_model_dir`: quantize a model folder layer by layer, straight from its shards.

The model skeleton is built on the meta device; shard 1 holds everything outside the
decoder layers (embeddings, vision tower, resampler, final norm, head), shards 2.. hold
one decoder layer each. The vision tower and resampler are calibrated on the calibration
images (one pass of the 16-bit model); without images they fall back to data-free search. Only the unit being processed is materialised, so peak memory is
about one layer plus the calibration activations. With calibration data, layer i's
Hessians are captured on the outputs of the already-quantized layers before it; the
activations are saved at every layer boundary so `resume=True` continues bit-exactly.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..codec.config import TrellisConfig
from ..format.qconfig import make_quantization_config
from ..format.source import SourceCheckpoint
from ..format.writer import CheckpointWriter
from ..models import ernie
from ..models.policy import quant_plan
from ..models.quantize import quantize_module
from .hessian import HessianCapture


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer 0 to record its inputs, then stops the forward."""

    def __init__(self, store: list):
        super().__init__()
        self.store = store

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append((hidden_states.detach(), {k: v for k, v in kwargs.items() if k != "past_key_values"}))
        raise _Stop


class _ShapeProbe:
    """Stands in for a SourceCheckpoint with meta tensors: resolves names and shapes, reads no data."""

    def __init__(self, src: SourceCheckpoint):
        self.src = src

    def __contains__(self, name):
        return name in self.src

    def get(self, name):
        if name not in self.src:
            raise ValueError(f"tensor {name} is missing from {self.src.dir} (not in the index)")
        return torch.empty(self.src.shape(name), device="meta")


def open_source(model_dir):
    """(source checkpoint, transformers config, model class, resolve(source, name)) for model_dir."""
    import transformers

    src = SourceCheckpoint(model_dir)
    raw = src.config
    if ernie.is_ernie_vl(raw):
        config = ernie.build_config(raw)
        n = config.text_config.moe_num_experts
        return src, config, transformers.Ernie4_5_VLMoeForConditionalGeneration, \
            lambda source, name: ernie.source_tensor(source, name, n)
    arch = (raw.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not hasattr(cls, "_from_config"):
        raise ValueError(f"{Path(model_dir) / 'config.json'}: unknown architecture "
                         f"(model_type {raw.get('model_type')!r}, architectures {raw.get('architectures')!r})")
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir))
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{Path(model_dir) / 'config.json'}: unknown architecture: {str(e).splitlines()[0]}") from None
    stored = _checkpoint_names(src, build_skeleton(cls, config))
    return src, config, cls, lambda source, name: source.get(stored.get(name, name))


def _checkpoint_names(src: SourceCheckpoint, model: nn.Module) -> dict[str, str]:
    """{model tensor name: checkpoint tensor name} through transformers' own checkpoint renamings
    (save_pretrained writes some models, LLaVA for one, under their legacy names)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta = model.state_dict()
    names = {}
    for key in src.keys():
        new, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if converted is None:  # a tensor that needs a real conversion is not a plain rename
            names[new] = key
    return names


def build_skeleton(cls, config) -> nn.Module:
    """The model with every parameter on the meta device (buffers stay real)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls._from_config(config)
    return model.eval()


def tied_targets(model: nn.Module) -> dict[str, str]:
    """{tied parameter: the parameter it shares} (e.g. lm_head.weight -> embed_tokens.weight)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return dict(tied) if getattr(model.config, "tie_word_embeddings", True) else {}


def _retie(model: nn.Module, tied: dict[str, str]):
    for target, source in tied.items():
        parent, _, leaf = target.rpartition(".")
        setattr(model.get_submodule(parent), leaf, model.get_parameter(source))


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's layer list: the biggest ModuleList named `layers` or `h`."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h") and len(mod):
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[2]:
                best = (name, mod, size)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no decoder layer list found (unknown architecture)")
    return best[0], best[1]


def unit_params(model: nn.Module, layers_name: str, num_layers: int) -> list[list[str]]:
    """Parameter names per unit: [outside the layers, layer 0, layer 1, ...]."""
    units = [[] for _ in range(num_layers + 1)]
    prefix = layers_name + "."
    tied = tied_targets(model)
    for name, _ in model.named_parameters():
        if name in tied:
            continue
        if name.startswith(prefix):
            units[int(name[len(prefix):].split(".", 1)[0]) + 1].append(name)
        else:
            units[0].append(name)
    return units


def _materialise(model, names, get, device):
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        t = get(name)
        _check_shape(model, name, t)
        set_module_tensor_to_device(model, name, device, value=t, dtype=t.dtype)  # keep the stored dtype


def _persistent_tensors(module: nn.Module, prefix: str, skip: str | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for mname, mod in module.named_modules(prefix=prefix):
        if skip is not None and (mname == skip or mname.startswith(skip + ".")):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.device.type != "meta":  # an untied-but-unread param is tied to one already stored
                out[f"{mname}.{pname}" if mname else pname] = p
        for bname, b in mod.named_buffers(recurse=False):
            if b is not None and b.device.type != "meta" and bname not in mod._non_persistent_buffers_set:
                out[f"{mname}.{bname}" if mname else bname] = b
    seen, dedup = set(), {}
    for k, v in out.items():  # tied weights are written once, under their first name
        key = (v.data_ptr(), v.device, tuple(v.shape))
        if key not in seen:
            seen.add(key)
            dedup[k] = v
    return dedup


def fingerprint(src: SourceCheckpoint, settings: dict) -> str:
    """Hash of the inputs (file names, sizes, mtimes, config) and every option."""
    files = sorted(p for p in src.dir.iterdir() if p.is_file())
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _calibration_fingerprint(path) -> list:
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return [[str(q), q.stat().st_size, q.stat().st_mtime_ns] for q in files]


@torch.no_grad()
def quantize_model_dir(model_dir, out_dir, bits: int = 2, *, calibration=None, samples: int = 128,
                       seq_len: int = 2048, overrides=(), resume: bool = False, overwrite: bool = False,
                       device: str = "cpu", seed: int = 0, rotate_output: bool = False, progress: bool = True,
                       target_bpw: float | None = None, finetune_steps: int = 0, **options) -> dict:
    """Quantize model_dir into the packed checkpoint out_dir; returns the report dict.

    target_bpw: choose 2, 3 or 4 bits per module for this average (see docs/QUALITY.md).
    finetune_steps: with calibration, tune each quantized layer's 16-bit parameters for this many
    steps (ccq.calibration.finetune) before the next layer calibrates on its outputs; 0 = off."""
    t_start = time.perf_counter()
    if bits not in (2, 3, 4):
        raise ValueError(f"bits must be 2, 3 or 4, got {bits!r}")
    TrellisConfig(bits=bits, rotate_output=rotate_output, **options)  # bad codec options fail before any output
    if target_bpw is not None:
        from .allocate import budget_bytes

        budget_bytes(1, target_bpw)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    src, config, cls, resolve = open_source(model_dir)
    model = build_skeleton(cls, config)
    plan = quant_plan(model, bits, overrides)
    layers_name, layers = decoder_layers(model)
    units = unit_params(model, layers_name, len(layers))
    probe = _ShapeProbe(src)
    for names in units:  # every tensor resolvable, with the right shape, before anything is written
        for name in names:
            _check_shape(model, name, resolve(probe, name))

    def get(name):
        return resolve(src, name)

    batches = None
    if calibration is not None:
        from .data import calibration_batches

        batches = calibration_batches(calibration, src.dir, config, samples, seq_len)
    dev = torch.device(device)
    opts = dict(options, device="cuda" if dev.type == "cuda" else "cpu")
    settings = {"bits": bits, "overrides": list(overrides), "options": opts, "seed": seed, "target_bpw": target_bpw,
                "finetune_steps": finetune_steps,
                "rotate_output": rotate_output, "samples": samples, "seq_len": seq_len,
                "calibration": None if calibration is None else _calibration_fingerprint(calibration)}
    writer = CheckpointWriter(out_dir, len(units), fingerprint(src, settings), overwrite=overwrite, resume=resume)
    try:
        if target_bpw is not None:  # the allocator's call site: a data-free first pass over the source weights
            from .allocate import allocate_model

            plan = allocate_model(model, plan, overrides, None, target_bpw, get=get, seed=seed,
                                  rotate_output=rotate_output, **opts)
        report = _run(model, units, layers_name, layers, plan, get, writer, batches, dev, seed, rotate_output,
                      opts, progress, finetune_steps)
        qc = make_quantization_config(model, bits, plan, overrides, seed=seed, rotate_output=rotate_output,
                                      **{k: v for k, v in opts.items() if k != "device"})
        if target_bpw is not None:
            qc["target_bpw"] = target_bpw
        cfg = json.loads(config.to_json_string(use_diff=False))
        cfg["quantization_config"] = qc
        full = _summary(report, bits, opts, calibration, samples, seq_len, time.perf_counter() - t_start)
        writer.finish(cfg, full, copy_from=src.dir)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        writer.abort()
        raise e
    return full


def _check_shape(model, name, t):
    expected = tuple(model.get_parameter(name).shape)
    if tuple(t.shape) != expected:
        raise ValueError(f"tensor {name} has shape {tuple(t.shape)}, the config expects {expected}")


def _run(model, units, layers_name, layers, plan, get, writer, batches, dev, seed, rotate_output, opts, progress,
         finetune_steps=0):
    with tqdm(total=len(units), desc="ccq quantize", unit="layer", disable=not progress) as bar:
        return _run_units(model, units, layers_name, layers, plan, get, writer, batches, dev, seed, rotate_output,
                          opts, bar, finetune_steps)


def _run_units(model, units, layers_name, layers, plan, get, writer, batches, dev, seed, rotate_output, opts, bar,
               finetune_steps=0):
    report = []
    n_layers = len(layers)
    acts = None
    # unit 0: everything outside the decoder layers (quantized data-free)
    if not writer.done(0):
        _materialise(model, units[0], get, dev)
        _retie(model, tied_targets(model))
        outside = [n for n in plan if not n.startswith(layers_name + ".")]
        hessians = None
        if batches is not None:  # vision tower / resampler statistics from the calibration images
            mods = dict(model.named_modules())
            with HessianCapture({n: mods[n] for n in outside}) as cap:
                _capture_inputs(model, layers, batches)
            hessians = cap.result()
        entries = []
        for name in outside:
            bar.set_postfix_str(name[-40:])
            entries += quantize_module(model, name, plan[name], hessians, seed, rotate_output, **opts)
        tensors = _persistent_tensors(model, "", skip=layers_name)
        if batches is not None:
            acts = _capture_inputs(model, layers, batches)
            torch.save(acts, writer.path("calib-acts-0.pt"))
        writer.write_shard(0, tensors, entries)
        _free_outside(model, layers_name)
    report += writer.report_of(0)
    bar.update(1)
    for i in range(n_layers):
        u = i + 1
        if writer.done(u):
            report += writer.report_of(u)
            bar.update(1)
            continue
        if batches is not None and acts is None:
            acts = torch.load(writer.path(f"calib-acts-{i}.pt"), weights_only=False)
        _materialise(model, units[u], get, dev)
        layer = layers[i]
        prefix = f"{layers_name}.{i}"
        names = [n for n in plan if n.startswith(prefix + ".")]
        hessians = None
        if acts is not None:
            mods = dict(model.named_modules())
            with HessianCapture({n: mods[n] for n in names}) as cap:
                for h, kw in acts:
                    layer(h.to(dev), **_to(kw, dev))
            hessians = cap.result()
        targets = None
        if acts is not None and finetune_steps:  # the 16-bit layer's outputs, for the fine-tuning below
            targets = [_first(layer(h.to(dev), **_to(kw, dev))).detach() for h, kw in acts]
        entries = []
        for name in tqdm(names, desc=f"layer {i}/{n_layers}", unit="module", leave=False, disable=bar.disable):
            bar.set_postfix_str(name[len(prefix) + 1:])
            entries += quantize_module(model, name, plan[name], hessians, seed, rotate_output, **opts)
        if targets is not None:  # the fine-tuning call site
            from .finetune import finetune_layer

            bar.set_postfix_str("finetune")
            tuned = finetune_layer(layer, [(h.to(dev), _to(kw, dev)) for h, kw in acts], targets,
                                   steps=finetune_steps, seed=seed + i)
            for e in entries:
                e["layer_finetune"] = tuned
        if acts is not None:
            acts = [(_first(layer(h.to(dev), **_to(kw, dev))).detach().cpu(), kw) for h, kw in acts]
            torch.save(acts, writer.path(f"calib-acts-{i + 1}.pt"))
        writer.write_shard(u, _persistent_tensors(layer, prefix), entries)
        if acts is not None:
            writer.path(f"calib-acts-{i}.pt").unlink(missing_ok=True)
        layers[i] = layer.to("meta")
        report += entries
        bar.update(1)
    return report


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _to(kw, dev):
    def mv(v):
        if isinstance(v, torch.Tensor):
            return v.to(dev)
        if isinstance(v, tuple):
            return tuple(mv(x) for x in v)
        return v
    return {k: mv(v) for k, v in kw.items()}


def _capture_inputs(model, layers, batches) -> list:
    """Run the (quantized) embedding/vision part and record layer 0's inputs per batch."""
    store = []
    first = layers[0]
    layers[0] = _Catcher(store)
    dev = next(p.device for p in model.parameters() if p.device.type != "meta")
    try:
        for batch in batches:
            try:
                model(**{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, use_cache=False)
            except _Stop:
                pass
    finally:
        layers[0] = first
    return [(h.cpu(), _to(kw, "cpu")) for h, kw in store]


def _free_outside(model, layers_name):
    """Send every stored tensor outside the decoder layers back to the meta device."""
    from accelerate.utils import set_module_tensor_to_device

    for name in _persistent_tensors(model, "", skip=layers_name):
        set_module_tensor_to_device(model, name, "meta")


def _summary(report, bits, opts, calibration, samples, seq_len, seconds) -> dict:
    import transformers

    from .. import __version__

    groups: dict[str, dict] = {}
    for e in report:
        g = groups.setdefault(e["group"], {"tensors": 0, "weights": 0, "bytes": 0})
        g["tensors"] += 1
        n = 1
        for d in e["shape"]:
            n *= d
        g["weights"] += n
        g["bytes"] += e["bytes"]
    return {
        "bits": bits,
        "options": {k: v for k, v in opts.items()},
        "calibration": None if calibration is None else {"path": str(calibration), "samples": samples,
                                                          "seq_len": seq_len},
        "tensors": report,
        "fallbacks": [e["tensor"] for e in report if "fallback" in e],
        "totals": {"quantized_tensors": len(report), "quantized_bytes": sum(e["bytes"] for e in report),
                   "quantize_seconds": round(sum(e["seconds"] for e in report), 3),
                   "wall_seconds": round(seconds, 3), "by_group": groups},
        "versions": {"ccq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
