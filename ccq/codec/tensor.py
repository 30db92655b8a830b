"""`QuantizedTensor`: the packed trellis codes of one weight (or a stack of experts).

Holds exactly what is written to disk (docs/FORMAT.md): int16 trellis words per 16x16
tile, fp16 per-output-channel scales, int8 sign vectors, and an int32 `meta` vector with
the shape and codec parameters. `dequantize()` is the torch reference decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bitstream import words_to_states_torch
from .codes import get_code
from .config import TrellisConfig, check_bits
from .hadamard import fwht, hadamard_block_size, random_signs, unrotate_in

FORMAT_VERSION = 1
TILE = 16
META_FIELDS = ("version", "bits", "L", "code_id", "had_in", "had_out", "experts", "out", "in")


def code_values_torch(states: torch.Tensor, code_id: int) -> torch.Tensor:
    """Torch twin of ``codes.code_values`` (int states in, float32 values out)."""
    code = get_code(code_id)
    x = (states.to(torch.int64) * code.mul + code.add) & 0xFFFFFFFF
    if code.kind == "bytesum":
        v = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)
        out = v.to(torch.float32) - 510.0
    else:
        x = (x & 0x8FFF8FFF) ^ 0x3B603B60

        def half(h):
            return torch.where(h >= 0x8000, h - 0x10000, h).to(torch.int16).view(torch.float16).float()

        out = half(x & 0xFFFF) + half(x >> 16)
    return out * torch.tensor(code.norm, dtype=torch.float32)


def tiles_to_matrix(t: torch.Tensor) -> torch.Tensor:
    """[..., ot, it, 256] row-major tiles -> [..., ot*16, it*16]."""
    *lead, ot, it, _ = t.shape
    t = t.reshape(*lead, ot, it, TILE, TILE).transpose(-3, -2)
    return t.reshape(*lead, ot * TILE, it * TILE)


def matrix_to_tiles(m: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tiles_to_matrix`."""
    *lead, r, c = m.shape
    m = m.reshape(*lead, r // TILE, TILE, c // TILE, TILE).transpose(-3, -2)
    return m.reshape(*lead, r // TILE, c // TILE, TILE * TILE)


def make_meta(shape: tuple[int, ...], cfg, had_in: int, had_out: int) -> torch.Tensor:
    """The int32 meta vector (META_FIELDS order) of a weight of `shape` packed with TrellisConfig `cfg`."""
    *lead, out, inp = shape
    return torch.tensor([FORMAT_VERSION, cfg.bits, cfg.L, get_code(cfg.code).code_id, had_in, had_out,
                         lead[0] if lead else 0, out, inp], dtype=torch.int32)


def packed_layout(shape: tuple[int, ...], bits: int, rotate_output: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{field: (shape, dtype)} of the QuantizedTensor that `quantize_tensor` makes for a weight
    of `shape` ([out, in] or [E, out, in]), without quantizing anything: what empty quantized
    modules are built from and what footprints are computed from."""
    check_bits(bits)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must be [out, in] or [experts, out, in], got {tuple(shape)}")
    *lead, out, inp = shape
    lead = tuple(lead)
    out_p, in_p = -(-out // TILE) * TILE, -(-inp // TILE) * TILE
    layout = {
        "trellis": (lead + (out_p // TILE, in_p // TILE, TILE * bits), torch.int16),
        "scales": (lead + (out_p,), torch.float16),
        "signs_in": ((in_p,), torch.int8),
        "meta": ((len(META_FIELDS),), torch.int32),
    }
    if rotate_output:
        layout["signs_out"] = ((out_p,), torch.int8)
    return layout


def packed_nbytes(shape: tuple[int, ...], bits: int, rotate_output: bool = False) -> int:
    """Exact bytes of the packed tensor (all fields): what `QuantizedTensor.nbytes` will report."""
    return sum(math.prod(shp) * dtype.itemsize for shp, dtype in packed_layout(shape, bits, rotate_output).values())


@dataclass
class QuantizedTensor:
    """Packed weight: see docs/FORMAT.md for the meaning of every field."""

    trellis: torch.Tensor  # int16 [*E, out_pad/16, in_pad/16, 16*bits]
    scales: torch.Tensor  # float16 [*E, out_pad]
    signs_in: torch.Tensor  # int8 [in_pad]
    signs_out: torch.Tensor | None  # int8 [out_pad] when the output side is rotated
    meta: torch.Tensor  # int32 [len(META_FIELDS)]

    def _m(self, field: str) -> int:
        return int(self.meta[META_FIELDS.index(field)])

    bits = property(lambda self: self._m("bits"))
    L = property(lambda self: self._m("L"))
    code = property(lambda self: get_code(self._m("code_id")).name)
    had_in = property(lambda self: self._m("had_in"))
    had_out = property(lambda self: self._m("had_out"))

    @property
    def shape(self) -> tuple[int, ...]:
        e = self._m("experts")
        oi = (self._m("out"), self._m("in"))
        return (e, *oi) if e else oi

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @property
    def bits_per_weight(self) -> float:
        """Every stored byte (codes, scales, signs, meta) over the number of weights."""
        return self.nbytes * 8 / self.numel

    def state_dict(self) -> dict[str, torch.Tensor]:
        d = {"trellis": self.trellis, "scales": self.scales, "signs_in": self.signs_in, "meta": self.meta}
        if self.signs_out is not None:
            d["signs_out"] = self.signs_out
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "QuantizedTensor":
        missing = {"trellis", "scales", "signs_in", "meta"} - set(d)
        if missing:
            raise ValueError(f"quantized tensor is missing {', '.join(sorted(missing))}")
        meta = d["meta"]
        if int(meta[0]) != FORMAT_VERSION:
            raise ValueError(f"unsupported ccq tensor format version {int(meta[0])} (this ccq reads {FORMAT_VERSION})")
        return cls(d["trellis"], d["scales"], d["signs_in"], d.get("signs_out"), meta)

    def expert(self, e: int) -> "QuantizedTensor":
        """Expert `e` of a stack as a 2-D QuantizedTensor (views, no copy of the codes)."""
        m = self.meta.clone()
        m[META_FIELDS.index("experts")] = 0
        return QuantizedTensor(self.trellis[e], self.scales[e], self.signs_in, self.signs_out, m)

    def to(self, device) -> "QuantizedTensor":
        so = None if self.signs_out is None else self.signs_out.to(device)
        return QuantizedTensor(self.trellis.to(device), self.scales.to(device), self.signs_in.to(device), so, self.meta)

    def rotated_weight(self) -> torch.Tensor:
        """W' = scales * code(states): the weight in the rotated basis, padded, float32."""
        states = words_to_states_torch(self.trellis, self.bits, self.L)
        w = tiles_to_matrix(code_values_torch(states, self._m("code_id")))
        return w * self.scales.float()[..., :, None]

    def dequantize(self) -> torch.Tensor:
        """Reconstructed weight, same shape as the input to ``quantize_tensor``, float32."""
        w = self.rotated_weight()
        if self.signs_out is not None:
            w = (fwht(w.transpose(-1, -2), self.had_out) * self.signs_out.float()).transpose(-1, -2)
        w = unrotate_in(w, self.signs_in, self.had_in)
        out, inp = self.shape[-2:]
        return w[..., :out, :inp].contiguous()

    def __repr__(self) -> str:
        return (f"QuantizedTensor(shape={self.shape}, bits={self.bits}, L={self.L}, code={self.code}, "
                f"bpw={self.bits_per_weight:.4f})")


def random_quantized(shape: tuple[int, ...], bits: int, code: str = "mul1", L: int = 16, device="cpu",
                     block: int = 512) -> QuantizedTensor:
    """A QuantizedTensor of random trellis words (every word pattern is a valid stream) with Hadamard blocks of
    at most `block` on the input side: kernel speed and dispatch do not depend on the values, so the kernel
    benchmarks and compile checks use these instead of running a search (`device="meta"` for no data)."""
    *lead, out, inp = shape
    op, ip = -(-out // 16) * 16, -(-inp // 16) * 16
    words = torch.randint(-32768, 32768, (*lead, op // 16, ip // 16, 16 * bits), dtype=torch.int32, device=device)
    scales = (torch.rand(*lead, op, device=device) * 0.02 + 0.01).half()
    meta = make_meta(tuple(shape), TrellisConfig(bits=bits, L=L, code=code), hadamard_block_size(ip, block), 0)
    return QuantizedTensor(words.to(torch.int16), scales, random_signs(ip, 0).to(device), None, meta)
