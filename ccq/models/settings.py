"""`QuantSettings`: the one object that says how a model is quantized.

The codec options (a `TrellisConfig`: bits, L, code, Hadamard blocks, rotate_output, ...), the
per-module overrides, the seed, the target bits per weight and the fine-tuning steps travel together from the CLI or API through the pipeline into
the checkpoint's `quantization_config`, and are read back from it by the loaders.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..codec.config import BITS, TrellisConfig

KEEP = 16  # override bits that keep a module 16-bit
RUN_ONLY = ("device",)  # codec options that change where the search runs, not the bytes


@dataclass(frozen=True)
class QuantSettings:
    """codec: the default TrellisConfig; overrides: (fnmatch pattern, bits 2/3/4/16) pairs, the
    last match wins; seed: the sign seed of every tensor; target_bpw: choose 2, 3 or 4 bits for
    every module no override names so that the quantized modules average this
    (ccq.calibration.allocate); finetune_steps: with calibration, Adam steps per decoder layer
    tuning its 16-bit parameters (ccq.calibration.finetune), 0 = off; guide_groups: with calibration,
    weight each token of a layer's Hessians by the 16-bit model's loss gradient at the module's outputs,
    one Hessian per this many groups of output rows (ccq.calibration.fisher), 0 = off; asymmetric: with
    calibration, quantize each linear toward the 16-bit model's outputs on the 16-bit model's inputs, the
    layer's modules one group after another (ccq.calibration.asymmetric); on by default (`of`) unless
    guide_groups asks for the plain objective's weighted Hessians."""

    codec: TrellisConfig = TrellisConfig()
    overrides: tuple[tuple[str, int], ...] = ()
    seed: int = 0
    target_bpw: float | None = None
    finetune_steps: int = 0
    guide_groups: int = 0
    asymmetric: bool = True

    def __post_init__(self):
        over = tuple((str(p), int(b)) for p, b in self.overrides)
        for p, b in over:
            if b not in BITS + (KEEP,):
                raise ValueError(f"module override {p}={b}: bits must be 2, 3, 4 or 16, got {b}")
        object.__setattr__(self, "overrides", over)
        if self.target_bpw is not None and not (math.isfinite(self.target_bpw) and self.target_bpw > 0):
            raise ValueError(f"target bpw must be a positive number, got {self.target_bpw!r}")
        if self.finetune_steps < 0:
            raise ValueError(f"finetune steps must be 0 or more, got {self.finetune_steps}")
        if self.guide_groups < 0:
            raise ValueError(f"guide groups must be 0 or more, got {self.guide_groups}")
        if self.asymmetric and self.guide_groups:
            raise ValueError("asymmetric calibration and guide groups cannot be combined (asymmetric is the default "
                             "with calibration: turn it off to use guide groups)")

    @classmethod
    def of(cls, bits: int = 2, *, overrides=(), seed: int = 0, target_bpw: float | None = None,
           finetune_steps: int = 0, guide_groups: int = 0, asymmetric: bool | None = None,
           **codec_options) -> "QuantSettings":
        """Settings from the keyword form the API and CLI take (codec_options: TrellisConfig fields);
        asymmetric None: on, unless guide_groups."""
        asymmetric = not guide_groups if asymmetric is None else bool(asymmetric)
        return cls(TrellisConfig(bits=bits, **codec_options), tuple(overrides), seed, target_bpw, finetune_steps,
                   guide_groups, asymmetric)

    @property
    def bits(self) -> int:
        return self.codec.bits

    def codec_for(self, bits: int) -> TrellisConfig:
        """The codec options for a module planned at `bits`."""
        return self.codec if bits == self.codec.bits else dataclasses.replace(self.codec, bits=bits)

    def to_dict(self) -> dict:
        """The serialisable form (what `quantization_config` and the run fingerprint hold)."""
        codec = {k: v for k, v in self.codec.to_dict().items() if k not in RUN_ONLY}
        return {**codec, "seed": self.seed, "overrides": [[p, b] for p, b in self.overrides],
                "target_bpw": self.target_bpw, "finetune_steps": self.finetune_steps, "guide_groups": self.guide_groups,
                "asymmetric": self.asymmetric}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSettings":
        """Read back `to_dict` output (or a `quantization_config`; unknown keys are ignored)."""
        fields = {f.name for f in dataclasses.fields(TrellisConfig)} - set(RUN_ONLY)
        codec = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
        return cls(TrellisConfig(**codec), tuple(tuple(o) for o in d.get("overrides", ())), int(d.get("seed", 0)),
                   d.get("target_bpw"), int(d.get("finetune_steps", 0)), int(d.get("guide_groups", 0)),
                   bool(d.get("asymmetric", False)))
