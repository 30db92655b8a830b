"""Computed (lookup-free) trellis codes: the value of an L-bit state.

Each code hashes the state with one 32-bit multiply(-add) and turns the hash into a
roughly N(0, 1) number with a few integer ops, so a GPU kernel can decode a weight
from its state without a table. The exact arithmetic is the format: see docs/FORMAT.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Code:
    """A computed code: ``value(s) = norm * f((s * mul + add) mod 2**32)``."""

    name: str
    code_id: int
    mul: int
    add: int
    kind: str  # "bytesum": sum of the four bytes - 510; "fp16sum": masked fp16 halves added
    norm: float  # makes the values roughly unit variance over all 2**16 states


# The 3INST / mcg mask and xor turn each 16-bit half into an fp16 number of magnitude 0.5..1
# (sign kept), so the sum of the two halves is a bell-shaped value.
FP16_MASK = 0x8FFF8FFF
FP16_XOR = 0x3B603B60

CODES: dict[str, Code] = {
    c.name: c
    for c in (
        Code("mul1", 0, 0x83DCD12D, 0, "bytesum", 1.0 / 147.8),
        Code("1mad", 1, 34038481, 76625530, "bytesum", 1.0 / 147.8),
        Code("mcg", 2, 0xCBAC1FED, 0, "fp16sum", 0.8038),
        Code("3inst", 3, 89226354, 64248484, "fp16sum", 0.8038),
    )
}
CODES_BY_ID = {c.code_id: c for c in CODES.values()}


def get_code(name_or_id: str | int) -> Code:
    """Look a code up by name or numeric id, with a clear error for unknown ones."""
    table = CODES_BY_ID if isinstance(name_or_id, int) else CODES
    if name_or_id not in table:
        raise ValueError(f"unknown trellis code {name_or_id!r}; known: {', '.join(CODES)}")
    return table[name_or_id]


def code_values(code: Code | str, states: np.ndarray) -> np.ndarray:
    """Decode an array of integer states to float32 values (the normative definition)."""
    code = get_code(code) if not isinstance(code, Code) else code
    s = np.asarray(states).astype(np.uint64)
    x = ((s * np.uint64(code.mul) + np.uint64(code.add)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    if code.kind == "bytesum":
        v = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)
        out = (v.astype(np.float32) - np.float32(510.0))
    else:
        x = (x & np.uint32(FP16_MASK)) ^ np.uint32(FP16_XOR)
        lo = (x & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)
        hi = (x >> 16).astype(np.uint16).view(np.float16).astype(np.float32)
        out = lo + hi
    return (out * np.float32(code.norm)).astype(np.float32)


def code_table(code: Code | str, L: int) -> np.ndarray:
    """Values of all 2**L states, float32 (what the Viterbi search compares against)."""
    return code_values(code, np.arange(1 << L, dtype=np.int64))
