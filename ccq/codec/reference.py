"""Numpy reference decoder: docs/FORMAT.md written as code, independent of torch.

Slow and plain on purpose: a third party can check a decoder of their own against it,
and ccq's torch decode and Triton kernels are tested bit-exact against it.
"""

from __future__ import annotations

import numpy as np

from .codes import CODES_BY_ID, code_values

META = ("version", "bits", "L", "code_id", "had_in", "had_out", "experts", "out", "in")


def hadamard_matrix(n: int) -> np.ndarray:
    """Orthonormal Sylvester Hadamard matrix: H[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
    i = np.arange(n)
    parity = np.zeros((n, n), dtype=np.int64)
    x = i[:, None] & i[None, :]
    while x.any():
        parity ^= x & 1
        x = x >> 1
    return (1 - 2 * parity).astype(np.float64) / np.sqrt(n)


def _block_hadamard_last(w: np.ndarray, block: int) -> np.ndarray:
    h = hadamard_matrix(block)
    shape = w.shape
    return (w.reshape(*shape[:-1], shape[-1] // block, block) @ h).reshape(shape)


def decode_states(words: np.ndarray, bits: int, L: int) -> np.ndarray:
    """Per-weight L-bit states of int16 tile words [..., 16*bits] -> [..., 256]."""
    u = words.astype(np.int64) & 0xFFFF
    nbits = u.shape[-1] * 16
    bitstream = ((u[..., :, None] >> np.arange(15, -1, -1)) & 1).reshape(*u.shape[:-1], nbits)
    states = np.zeros((*u.shape[:-1], nbits // bits), dtype=np.int64)
    for t in range(nbits // bits):
        end = (t + 1) * bits
        for b in range(end - L, end):  # window of L bits ending at bit (t+1)*bits, read circularly
            states[..., t] = (states[..., t] << 1) | bitstream[..., b % nbits]
    return states


def decode_rotated(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """W' = scale * code(state) in the rotated, padded basis, float32 [(E,) out_pad, in_pad].

    float32 arithmetic throughout, so any conforming decoder reproduces it bit for bit.
    """
    meta = dict(zip(META, (int(v) for v in tensors["meta"])))
    if meta["version"] != 1:
        raise ValueError(f"unsupported format version {meta['version']}")
    code = CODES_BY_ID[meta["code_id"]]
    words = tensors["trellis"]
    *lead, ot, it, _ = words.shape
    values = code_values(code, decode_states(words, meta["bits"], meta["L"]))  # [..., ot, it, 256]
    tiles = values.reshape(*lead, ot, it, 16, 16)
    w = np.swapaxes(tiles, -3, -2).reshape(*lead, ot * 16, it * 16)  # tile (i, j), t = 16 r + c
    return w * tensors["scales"].astype(np.float32)[..., :, None]


def decode(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """Decode one packed tensor (its state dict as numpy arrays) to float32 [(E,) out, in]."""
    meta = dict(zip(META, (int(v) for v in tensors["meta"])))
    w = decode_rotated(tensors).astype(np.float64)
    if "signs_out" in tensors:
        w = np.swapaxes(_block_hadamard_last(np.swapaxes(w, -1, -2), meta["had_out"]), -1, -2)
        w = w * tensors["signs_out"].astype(np.float64)[:, None]
    w = _block_hadamard_last(w, meta["had_in"]) * tensors["signs_in"].astype(np.float64)
    return w[..., : meta["out"], : meta["in"]].astype(np.float32)
