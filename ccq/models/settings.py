"""`QuantSettings`: the one object that says how a model is quantized.

The codec options (a `TrellisConfig`: bits, L, code, Hadamard blocks, rotate_output, ...), the
per-module overrides and the seed travel together from the CLI or API through the pipeline into
the checkpoint's `quantization_config`, and are read back from it by the loaders.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..codec.config import BITS, TrellisConfig

KEEP = 16  # override bits that keep a module 16-bit
RUN_ONLY = ("device",)  # codec options that change where the search runs, not the bytes


@dataclass(frozen=True)
class QuantSettings:
    """codec: the default TrellisConfig; overrides: (fnmatch pattern, bits 2/3/4/16) pairs, the
    last match wins; seed: the sign seed of every tensor."""

    codec: TrellisConfig = TrellisConfig()
    overrides: tuple[tuple[str, int], ...] = ()
    seed: int = 0

    def __post_init__(self):
        over = tuple((str(p), int(b)) for p, b in self.overrides)
        for p, b in over:
            if b not in BITS + (KEEP,):
                raise ValueError(f"module override {p}={b}: bits must be 2, 3, 4 or 16, got {b}")
        object.__setattr__(self, "overrides", over)

    @classmethod
    def of(cls, bits: int = 2, *, overrides=(), seed: int = 0, **codec_options) -> "QuantSettings":
        """Settings from the keyword form the API and CLI take (codec_options: TrellisConfig fields)."""
        return cls(TrellisConfig(bits=bits, **codec_options), tuple(overrides), seed)

    @property
    def bits(self) -> int:
        return self.codec.bits

    def codec_for(self, bits: int) -> TrellisConfig:
        """The codec options for a module planned at `bits`."""
        return self.codec if bits == self.codec.bits else dataclasses.replace(self.codec, bits=bits)

    def to_dict(self) -> dict:
        """The serialisable form (what `quantization_config` and the run fingerprint hold)."""
        codec = {k: v for k, v in self.codec.to_dict().items() if k not in RUN_ONLY}
        return {**codec, "seed": self.seed, "overrides": [[p, b] for p, b in self.overrides]}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSettings":
        """Read back `to_dict` output (or a `quantization_config`; unknown keys are ignored)."""
        fields = {f.name for f in dataclasses.fields(TrellisConfig)} - set(RUN_ONLY)
        codec = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
        return cls(TrellisConfig(**codec), tuple(tuple(o) for o in d.get("overrides", ())), int(d.get("seed", 0)))
