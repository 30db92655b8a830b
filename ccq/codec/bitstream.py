"""Tail-biting bitstream of one tile: states <-> packed 16-bit words.

A tile of T weights at k bits is a circular stream of T*k bits, stored MSB-first in
T*k/16 words. The state of weight t is the L-bit window that ends at bit (t+1)*k,
read circularly, so every weight is a pure function of its window (random access).
"""

from __future__ import annotations

import numpy as np
import torch


def states_to_words(states: np.ndarray, k: int) -> np.ndarray:
    """Pack the low k bits of each state ([..., T]) into int16 words ([..., T*k/16])."""
    states = np.asarray(states)
    T = states.shape[-1]
    new = (states & ((1 << k) - 1)).astype(np.uint8)
    bits = np.unpackbits(new[..., None], axis=-1)[..., 8 - k:]  # MSB-first k bits per step
    bits = bits.reshape(*states.shape[:-1], T * k)
    packed = np.packbits(bits, axis=-1)  # bytes, MSB-first
    words = (packed[..., 0::2].astype(np.uint16) << 8) | packed[..., 1::2]
    return words.view(np.int16)


def words_to_states(words: np.ndarray, k: int, L: int) -> np.ndarray:
    """Unpack int16 words ([..., W]) back into the L-bit state of every weight ([..., W*16/k])."""
    w = np.asarray(words).view(np.uint16).astype(np.uint32)
    nbits = w.shape[-1] * 16
    T = nbits // k
    end = (np.arange(T) + 1) * k  # window of weight t is bits [end - L, end), circular
    start = (end - L) % nbits
    word = start // 16
    off = start % 16
    pair = (w[..., word] << 16) | w[..., (word + 1) % w.shape[-1]]
    return ((pair >> (32 - L - off)) & ((1 << L) - 1)).astype(np.int32)


def words_to_states_torch(words: torch.Tensor, k: int, L: int) -> torch.Tensor:
    """Torch twin of :func:`words_to_states` (int16 words in, int32 states out)."""
    w = words.to(torch.int32) & 0xFFFF
    n = w.shape[-1]
    nbits = n * 16
    T = nbits // k
    end = (torch.arange(T, device=words.device) + 1) * k
    start = (end - L) % nbits
    word = start // 16
    off = start % 16
    pair = (w[..., word] << 16) | w[..., (word + 1) % n]
    # int32 shifts are arithmetic; mask after the shift keeps only the window
    return (pair >> (32 - L - off)) & ((1 << L) - 1)
