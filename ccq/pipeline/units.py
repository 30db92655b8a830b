"""The per-unit step of the quantizer, shared by `quantize_model_dir` and `quantize_model`.

A model is quantized unit by unit: unit 0 is everything outside the decoder layers
(embeddings, vision tower, resampler, final norm, head), unit i+1 is decoder layer i. Every
unit goes through the same stages, in `Pipeline.step`:

1. load      materialise the unit's weights (from the source shards; a no-op in memory)
2. hessians  run the unit's calibration inputs through the 16-bit unit, capturing the input
             Hessians of its planned modules
3. quantize  replace every planned module by its quantized twin, at the bits the plan gives it
             (with a target bpw, `ccq.calibration.allocate` chose them before the first unit)
   finetune  with `finetune_steps`, tune the layer's 16-bit parameters so that it reproduces
             the 16-bit layer's outputs (captured in step 2)
4. forward   run the inputs through the quantized unit: the next unit's inputs, so layer i
             is calibrated on the outputs of the quantized layers < i
5. write     the unit's tensors to its shard, with the activations a resume starts from
             (a no-op in memory), then release the unit's memory

Unit 0's calibration inputs are the batches themselves: its Hessians come from one pass that
stops at decoder layer 0, and its "forward" records layer 0's inputs.

Disk I/O overlaps the compute (`overlap=True`): while unit i is calibrated and quantized on the
device, a writer thread writes unit i-1's shard and then a reader thread reads unit i+1's weights
from the source shards into host memory. Reading (file I/O, the NaN/Inf check, checkpoint
conversions) and writing (device-to-host copies, serialisation) are mostly native code that runs
beside the main thread's kernels, so the device need not wait for the disk. One unit's I/O is in
flight at a time, so memory holds about two units (the one computed, the one read or written);
shards are written in unit order, and a read or write error surfaces on the main thread as the
same error it is without the threads.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.capture import capture_layer_inputs, first_output, to_device
from ..calibration.hessian import HessianCapture
from ..codec.quantizer import row_groups
from ..models.quant_modules import experts_kind
from ..models.quantize import quantize_module
from ..models.settings import QuantSettings
from ..models.skeleton import decoder_layers, persistent_tensors, retie, tied_targets, unit_params


# host memory for the decoder layers' inputs that `Pipeline.measure` keeps: it uses the first
# calibration samples whose inputs to every layer fit (all 32 x 512 tokens of SmolLM2, 58 of
# ERNIE-4.5-VL-28B's 128 x 2048 in bf16, 9 of the 424B's)
MEASURE_BYTES = 16 << 30


@dataclass
class Unit:
    """One step of the pipeline: unit 0 (outside the layers) or decoder layer `index - 1`."""

    index: int
    prefix: str  # module name prefix ("" for unit 0)
    params: list[str]  # parameter names to materialise
    planned: list[str]  # module names to quantize


def materialise(model: nn.Module, names, get, device):
    """Load the parameters `names` (via get(name)) onto `device`, in their stored dtype."""
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        t = get(name)
        check_shape(model, name, t)
        set_module_tensor_to_device(model, name, device, value=t, dtype=t.dtype)


def check_shape(model: nn.Module, name: str, t: torch.Tensor):
    expected = tuple(model.get_parameter(name).shape)
    if tuple(t.shape) != expected:
        raise ValueError(f"tensor {name} has shape {tuple(t.shape)}, the config expects {expected}")


class Pipeline:
    """Quantize `model` unit by unit with `settings` and `plan`.

    get: name -> tensor reads a unit's weights (None: the model is already in memory).
    writer: a CheckpointWriter (None: keep the quantized model in memory). batches: calibration
    input dicts (None: data-free). device: where units are materialised and run. overlap: read
    the next unit and write the previous one in background threads (False: one after another,
    about one unit in memory).
    """

    def __init__(self, model: nn.Module, plan: dict[str, int], settings: QuantSettings, *, batches=None,
                 get=None, writer=None, device="cpu", progress: bool = False, overlap: bool = True):
        self.model, self.plan, self.settings = model, plan, settings
        self.batches, self.get, self.writer = batches, get, writer
        self.device = torch.device(device)
        self.progress, self.overlap = progress, overlap
        self.layers_name, self.layers = decoder_layers(model)
        params = unit_params(model, self.layers_name, len(self.layers))
        self.units = []
        for i, names in enumerate(params):
            prefix = "" if i == 0 else f"{self.layers_name}.{i - 1}"
            planned = [n for n in plan if (n.startswith(prefix + ".") if i else
                                           not n.startswith(self.layers_name + "."))]
            self.units.append(Unit(i, prefix, names, planned))
        self.acts = None  # the current unit's calibration inputs [(hidden, layer kwargs)]
        self.acts_fp = None  # with `asymmetric`: the 16-bit model's hidden states for the same inputs
        self.guides = None  # {module: per-sample token weights of its Hessian}, from `measure`
        self.reads = self.writes = None  # the reader and writer threads, while `run` runs
        self.after: dict[int, int] = {}  # unit index -> the unit to read ahead while it runs
        self.reading: tuple[int, Future] | None = None  # (unit index, its weights), read ahead
        self.writing: Future | None = None  # the shard write in flight

    def run(self) -> list[dict]:
        """Every unit in order (units a resumed writer already holds are skipped); the report.

        Leaving, even on an error, waits for the read and the write in flight, so a failed run
        leaves complete shards only and `writer.abort` races with nothing."""
        report = []
        todo = [u.index for u in self.units if self.writer is None or not self.writer.done(u.index)]
        self.after = dict(zip(todo, todo[1:])) if self.overlap else {}
        try:
            with (ThreadPoolExecutor(1, "ccq-read") as self.reads, ThreadPoolExecutor(1, "ccq-write") as self.writes,
                  tqdm(total=len(self.units), desc="ccq quantize", unit="layer", disable=not self.progress) as bar):
                for unit in self.units:
                    if unit.index in todo:
                        report += self.step(unit, bar)
                    else:
                        report += self.writer.report_of(unit.index)
                        self.acts = None
                    bar.update(1)
                self.wait_write()
        finally:
            self.reads = self.writes = self.reading = self.writing = None
        return report

    def step(self, unit: Unit, bar) -> list[dict]:
        """load -> hessians -> quantize -> forward -> write, for one unit."""
        self.load(unit)
        if self.settings.asymmetric and self.batches is not None and unit.index > 0:
            entries, targets = self.quantize_asymmetric(unit, bar)
        else:
            hessians, targets = self.hessians(unit)
            entries = self.quantize(unit, hessians, bar)
        self.finetune(unit, targets, entries)
        self.forward(unit)
        self.write(unit, entries)
        return entries

    def measure(self, names) -> dict[str, dict[int, float]]:
        """Costs of the modules `names` at each candidate bit width (`allocate.weight_costs`), from the
        16-bit model on the calibration batches; nothing is written, and `run` starts again from unit 0.
        With `settings.guide_groups`, also the decoder layers' token weights (`self.guides`) that the
        quantizing pass weights their Hessians with (`ccq.calibration.fisher`).

        A forward pass unit by unit keeps every decoder layer's inputs (of the first samples that fit
        in MEASURE_BYTES) and ends in the next-token loss; then the layers in reverse, each run again
        from its inputs, give their modules' Hessians and, backpropagating the loss, their outputs'
        Fisher (`ccq.calibration.fisher`). Unit 0's modules (vision tower, resampler) come
        last, weighted by the mean Fisher of layer 0's inputs. A model without an output head: Hessians."""
        from ..calibration.allocate import weight_costs
        from ..calibration.fisher import OutputFisher, lm_loss

        wanted = lambda unit: [n for n in unit.planned if n in names]  # noqa: E731
        u0 = self.units[0]
        self.load(u0)
        loss = lm_loss(self.model, self.layers_name)
        hessians0, _ = self.hessians(u0, outputs=False)
        self.forward(u0)
        per_sample = sum(h.numel() * h.element_size() for h, _ in self.acts) / len(self.acts) * len(self.layers)
        self.acts = self.acts[:max(1, int(MEASURE_BYTES // per_sample))]
        inputs = []
        for unit in tqdm(self.units[1:], desc="ccq measure (forward)", unit="layer", disable=not self.progress):
            self.load(unit)
            inputs.append(self.acts)
            self.forward(unit)
            self._release_measured(unit)
        grads = None
        if loss is not None:
            with torch.enable_grad():
                grads = []
                for (h, _), batch in zip(self.acts, self.batches):
                    h = h.to(self.device).requires_grad_()
                    grads.append(torch.autograd.grad(loss(h, batch["input_ids"]), h)[0])
        costs = {}
        for unit, acts in tqdm(list(zip(self.units[1:], inputs))[::-1], desc="ccq measure (backward)", unit="layer",
                               disable=not self.progress):
            self.load(unit)
            layer, mods = self.layers[unit.index - 1], dict(self.model.named_modules())
            planned = {n: mods[n] for n in unit.planned}
            with HessianCapture(planned) as hc, OutputFisher(planned, self._groups(planned, grads)) as fc, \
                    torch.enable_grad():
                for k, (h, kw) in enumerate(acts):
                    h = h.to(self.device).requires_grad_(grads is not None)
                    out = first_output(layer(h, **to_device(kw, self.device)))
                    if grads is not None:
                        grads[k] = torch.autograd.grad(out, h, grads[k])[0]
            costs.update(weight_costs(self.model, wanted(unit), hc.result(), self.settings, fc.result()))
            if self.settings.guide_groups and grads is not None:
                self.guides = {**(self.guides or {}), **fc.saliency()}
            self._release_measured(unit)
        fisher0 = None
        if grads is not None:
            f = float(sum((g.double() ** 2).sum() for g in grads) / sum(g.numel() for g in grads))
            fisher0 = {k: f for k in hessians0}
        costs.update(weight_costs(self.model, wanted(u0), hessians0, self.settings, fisher0))
        self._release_measured(u0)
        self.acts = self.acts_fp = None
        return costs

    def _groups(self, planned: dict[str, nn.Module], grads) -> dict[str, int]:
        """{module: row groups of its guided Hessian}: up to `guide_groups` for a linear (one when the
        output side is rotated, which mixes the rows), one for fused experts; {} when not guided."""
        g = self.settings.guide_groups
        if not g or grads is None:
            return {}
        return {n: row_groups(m.out_features, g) if isinstance(m, nn.Linear) and not self.settings.codec.rotate_output
                else 1 for n, m in planned.items()}

    def _release_measured(self, unit: Unit):
        if self.get is not None:  # streaming; in memory the model stays
            self.release(unit)

    # -- the stages --------------------------------------------------------------------------

    def load(self, unit: Unit):
        if self.batches is not None and unit.index > 0 and self.acts is None:  # resumed mid-model
            self.acts = torch.load(self.writer.path(f"calib-acts-{unit.index - 1}.pt"), weights_only=False)
            if self.settings.asymmetric:
                self.acts_fp = torch.load(self.writer.path(f"calib-fp-{unit.index - 1}.pt"), weights_only=True)
        if self.get is None:
            return
        if self.reading is not None and self.reading[0] == unit.index:
            weights = self.reading[1].result()  # a read error surfaces here, as it would unthreaded
        else:
            weights = self.read(unit)
        self.reading = None
        if unit.index in self.after:
            nxt = self.units[self.after[unit.index]]
            self.reading = (nxt.index, self.reads.submit(self.read, nxt, self.writing))
        materialise(self.model, unit.params, weights.pop, self.device)
        if unit.index == 0:
            retie(self.model, tied_targets(self.model))

    def hessians(self, unit: Unit, outputs: bool = True) -> tuple[dict | None, list | None]:
        """The planned modules' input Hessians, and (when fine-tuning) the 16-bit layer's outputs
        of the same pass: the targets the quantized layer is tuned to reproduce."""
        if self.batches is None:
            return None, None
        mods = dict(self.model.named_modules())
        keep = outputs and self.settings.finetune_steps > 0 and unit.index > 0
        targets = [] if keep else None
        with HessianCapture({n: mods[n] for n in unit.planned}, self.guides if unit.index else None) as cap:
            if unit.index == 0:  # vision tower / resampler statistics from the calibration images
                acts = capture_layer_inputs(self.model, self.layers, self.batches)
                if self.settings.asymmetric:
                    self.acts_fp = [h for h, _ in acts]
            else:
                layer = self.layers[unit.index - 1]
                for cap.step, (h, kw) in enumerate(self.acts):
                    out = layer(h.to(self.device), **to_device(kw, self.device))
                    if keep:
                        targets.append(first_output(out).detach())
        return cap.result(), targets

    def quantize_asymmetric(self, unit: Unit, bar) -> tuple[list[dict], list | None]:
        """Quantize a decoder layer's modules toward the 16-bit model (`ccq.calibration.asymmetric`): group
        by group in call order, each from a pass of the layer as quantized so far on the quantized stream
        beside its 16-bit twin on the 16-bit stream (the quantized linears decoded once for these passes).
        Returns the report entries and the 16-bit layer's outputs on the 16-bit stream: the next layer's
        16-bit inputs and the fine-tuning targets."""
        import copy

        from ..calibration.asymmetric import PairedCapture, call_groups, decoded_linear, target_weight

        layer, dev = self.layers[unit.index - 1], self.device
        kws = [to_device(kw, dev) for _, kw in self.acts]
        with torch.no_grad():
            fp_out = [first_output(layer(hf.to(dev), **kw)).detach() for hf, kw in zip(self.acts_fp, kws)]
        entries, packed = [], []
        if unit.planned:
            twin = dict(copy.deepcopy(layer).named_modules(prefix=unit.prefix))
            mods = dict(self.model.named_modules())
            with torch.no_grad():
                first = self.acts[0][0].to(dev)
                groups = call_groups({n: mods[n] for n in unit.planned}, lambda: layer(first, **kws[0]))
        else:
            groups = []
        desc = f"layer {unit.index - 1}/{len(self.layers)}"
        for group in tqdm(groups, desc=desc, unit="group", leave=False, disable=bar.disable):
            mods = dict(self.model.named_modules())
            with PairedCapture({n: mods[n] for n in group}, {n: twin[n] for n in group}) as cap, torch.no_grad():
                for (h, _), hf, kw in zip(self.acts, self.acts_fp, kws):
                    cap.run(twin[unit.prefix], hf.to(dev), **kw)
                    cap.run(layer, h.to(dev), **kw)
            hessians = cap.hessians()
            for name in group:
                bar.set_postfix_str(name[len(unit.prefix) + 1:])
                mod = mods[name]
                weights = {name: mod.weight} if isinstance(mod, nn.Linear) else \
                    {f"{name}.{k}": w for k, w in experts_kind(mod).dense(mod).items()}
                targets = {k: target_weight(w, hessians[k], cap.cross(k))
                           for k, w in weights.items() if k in hessians}
                entries += quantize_module(self.model, name, self.plan[name], hessians, self.settings, targets)
                if isinstance(mod, nn.Linear):  # decoded once for the passes of the groups after it
                    parent_name, _, child = name.rpartition(".")
                    parent = self.model.get_submodule(parent_name)
                    packed.append((parent, child, getattr(parent, child)))
                    setattr(parent, child, decoded_linear(packed[-1][2], mod.weight.dtype))
        for parent, child, q in packed:
            setattr(parent, child, q)
        self.acts_fp = [o.cpu() for o in fp_out]
        return entries, (fp_out if self.settings.finetune_steps > 0 else None)

    def finetune(self, unit: Unit, targets: list | None, entries: list[dict]):
        """Tune the quantized layer's 16-bit parameters to its 16-bit outputs (ccq.calibration.finetune); a
        layer with nothing quantized is left as it is."""
        if targets is None or not unit.planned:
            return
        from ..calibration.finetune import finetune_layer

        inputs = [(h.to(self.device), to_device(kw, self.device)) for h, kw in self.acts]
        stats = finetune_layer(self.layers[unit.index - 1], inputs, targets, steps=self.settings.finetune_steps,
                               seed=self.settings.seed + unit.index - 1)
        for e in entries:
            e["layer_finetune"] = stats

    def quantize(self, unit: Unit, hessians: dict | None, bar) -> list[dict]:
        entries = []
        desc = "outside the layers" if unit.index == 0 else f"layer {unit.index - 1}/{len(self.layers)}"
        for name in tqdm(unit.planned, desc=desc, unit="module", leave=False, disable=bar.disable):
            bar.set_postfix_str(name[len(unit.prefix) + 1:] if unit.prefix else name[-40:])
            entries += quantize_module(self.model, name, self.plan[name], hessians, self.settings)
        return entries

    def forward(self, unit: Unit):
        if self.batches is None:
            return
        if unit.index == 0:
            self.acts = capture_layer_inputs(self.model, self.layers, self.batches)
        else:
            layer = self.layers[unit.index - 1]
            self.acts = [(first_output(layer(h.to(self.device), **to_device(kw, self.device))).detach().cpu(), kw)
                         for h, kw in self.acts]

    def write(self, unit: Unit, entries: list[dict]):
        if self.writer is None:
            return
        if unit.index == 0:
            tensors = persistent_tensors(self.model, "", skip=self.layers_name)
        else:
            tensors = persistent_tensors(self.layers[unit.index - 1], unit.prefix)
        tensors = {k: v.detach() for k, v in tensors.items()}  # still the unit's data once it is released
        self.wait_write()
        self.writing = self.writes.submit(self.save, unit.index, tensors, entries, self.acts, self.acts_fp)
        if not self.overlap:
            self.wait_write()
        self.release(unit)

    # -- the reader and writer threads -------------------------------------------------------

    def read(self, unit: Unit, writing: Future | None = None) -> dict[str, torch.Tensor]:
        """The unit's weights, in host memory, once the shard write `writing` is done (one unit's
        I/O at a time); a failed write fails the read, so its error surfaces at the next load."""
        if writing is not None:
            writing.result()
        return {name: self.get(name) for name in unit.params}

    def save(self, index: int, tensors: dict[str, torch.Tensor], entries: list[dict], acts, acts_fp=None):
        """Unit `index`'s shard, with the activations a resume starts from (and the 16-bit stream's, when
        asymmetric); in this order, so a shard the writer records as done always has its activations on disk."""
        if acts_fp is not None:
            torch.save(acts_fp, self.writer.path(f"calib-fp-{index}.pt"))
        if acts is not None:
            torch.save(acts, self.writer.path(f"calib-acts-{index}.pt"))
        self.writer.write_shard(index, tensors, entries)
        if index > 0 and acts is not None:
            self.writer.path(f"calib-acts-{index - 1}.pt").unlink(missing_ok=True)
            self.writer.path(f"calib-fp-{index - 1}.pt").unlink(missing_ok=True)

    def wait_write(self):
        """Wait for the shard write in flight; its error surfaces here."""
        writing, self.writing = self.writing, None
        if writing is not None:
            writing.result()

    def release(self, unit: Unit):
        """Send the unit back to the meta device (a shard write in flight keeps its own references): the
        model holds about one unit."""
        from accelerate.utils import set_module_tensor_to_device

        if unit.index == 0:
            for name in persistent_tensors(self.model, "", skip=self.layers_name):
                set_module_tensor_to_device(self.model, name, "meta")
        else:
            i = unit.index - 1
            self.layers[i] = self.layers[i].to("meta")
