"""`TrellisConfig`: every knob of the codec in one validated object."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .codes import get_code

BITS = (2, 3, 4)


def check_bits(bits) -> int:
    """The one check of a bit width (every layer that takes bits calls it)."""
    if bits not in BITS:
        raise ValueError(f"bits must be 2, 3 or 4, got {bits!r}")
    return bits


@dataclass(frozen=True)
class TrellisConfig:
    """How to quantize one weight.

    bits: 2, 3 or 4 bits per weight. L: trellis state bits (8..16). code: computed code name.
    hadamard_block: largest input-side Hadamard block (a power of two). rotate_output: also
    rotate the output side. damp: Hessian damping, relative to its mean diagonal.
    scale_grid: factors of RMS/RMS(code) tried for the per-channel scales (the best is then
    refined halfway to its neighbours).
    scale_sample_tiles: how many tiles the scale search looks at. tailbite_candidates: overlaps
    tried per tile (1 = the two-pass approximation; each more costs one pass, CPU search only).
    device: "cpu", "cuda" or None (CUDA when available) for the Viterbi search.
    """

    bits: int = 2
    L: int = 16
    code: str = "mul1"
    hadamard_block: int = 512
    rotate_output: bool = False
    damp: float = 0.01
    scale_grid: tuple[float, ...] = field(default=(0.8, 0.9, 1.0, 1.1, 1.2))
    scale_sample_tiles: int = 16
    tailbite_candidates: int = 1
    device: str | None = None

    def __post_init__(self):
        check_bits(self.bits)
        if not 8 <= self.L <= 16 or self.L <= self.bits:
            raise ValueError(f"L must be in 8..16, got {self.L!r}")
        get_code(self.code)
        hb = self.hadamard_block
        if hb < 1 or hb & (hb - 1):
            raise ValueError(f"hadamard_block must be a power of two, got {hb!r}")
        if not self.scale_grid or min(self.scale_grid) <= 0:
            raise ValueError(f"scale_grid must hold positive factors, got {self.scale_grid!r}")
        if self.tailbite_candidates < 1:
            raise ValueError(f"tailbite_candidates must be >= 1, got {self.tailbite_candidates!r}")
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale_grid"] = list(self.scale_grid)
        return d
