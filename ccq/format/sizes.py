"""Exact packed layout of a QuantizedTensor from its shape and options alone (no weights).

Used to build empty quantized modules before loading (the loader, the transformers
quantizer) and to compute model footprints from a config (a later `ccq plan`).
"""

from __future__ import annotations

import torch

from ..codec.tensor import META_FIELDS, TILE


def _pad16(n: int) -> int:
    return -(-n // TILE) * TILE


def packed_layout(shape: tuple[int, ...], bits: int, rotate_output: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{field: (shape, dtype)} of the QuantizedTensor that `quantize_tensor` makes for `shape`."""
    if bits not in (2, 3, 4):
        raise ValueError(f"bits must be 2, 3 or 4, got {bits!r}")
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must be [out, in] or [experts, out, in], got {tuple(shape)}")
    *lead, out, inp = shape
    lead = tuple(lead)
    out_p, in_p = _pad16(out), _pad16(inp)
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
    """Bytes on disk of the packed tensor (all fields), equal to `QuantizedTensor.nbytes`."""
    total = 0
    for shp, dtype in packed_layout(shape, bits, rotate_output).values():
        n = 1
        for d in shp:
            n *= d
        total += n * torch.empty((), dtype=dtype).element_size()
    return total
