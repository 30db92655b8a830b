"""Bit-level behaviour of the trellis: packing, tail-biting, the two search backends."""

import numpy as np
import pytest
import torch

from ccq.codec.bitstream import states_to_words, words_to_states, words_to_states_torch
from ccq.codec.codes import CODES, code_table, code_values
from ccq.codec.viterbi_numba import viterbi_tiles
from ccq.codec.viterbi_torch import viterbi_tiles_torch


def _states_from_bits(bits: np.ndarray, k: int, L: int) -> np.ndarray:
    """States of a circular bitstream, computed the slow obvious way."""
    n = len(bits)
    out = []
    for t in range(n // k):
        end = (t + 1) * k
        out.append(int("".join(str(bits[(end - L + i) % n]) for i in range(L)), 2))
    return np.array(out)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("L", [8, 12, 16])
def test_pack_unpack_round_trip(k, L):
    rng = np.random.default_rng(k * 100 + L)
    bits = rng.integers(0, 2, 256 * k)
    states = _states_from_bits(bits, k, L)
    words = states_to_words(states, k)
    assert words.dtype == np.int16 and words.shape == (16 * k,)
    assert np.array_equal(words_to_states(words, k, L), states)
    assert np.array_equal(words_to_states_torch(torch.from_numpy(words), k, L).numpy(), states)
    # MSB-first: the first word's top bit is the stream's first bit
    assert (int(words.view(np.uint16)[0]) >> 15) == bits[0]


@pytest.mark.parametrize("k,L", [(2, 8), (3, 10), (4, 12), (2, 16)])
def test_search_obeys_tail_biting_on_every_tile(k, L):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    states, cost = viterbi_tiles(x, 1.0, code_table("mul1", L), k, L)
    low = (1 << (L - k)) - 1
    prev = np.roll(states, 1, axis=1)  # circular: state 0's predecessor is state 255
    assert np.all((states >> k) == (prev & low))
    # the packed words give back exactly the searched states
    assert np.array_equal(words_to_states(states_to_words(states, k), k, L), states)
    # the reported cost is the squared error of the path
    sse = ((code_table("mul1", L)[states] - x) ** 2).sum(1)
    np.testing.assert_allclose(cost, sse, rtol=1e-4)


def test_more_tailbite_candidates_never_worse():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    code = code_table("mul1", 10)
    _, c1 = viterbi_tiles(x, 1.0, code, 2, 10, candidates=1)
    _, c4 = viterbi_tiles(x, 1.0, code, 2, 10, candidates=4)
    assert np.all(c4 <= c1 + 1e-5)


@pytest.mark.parametrize("k,L", [(2, 8), (4, 10)])
def test_numba_and_torch_search_agree(k, L):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, (5, 256)).astype(np.float32)
    code = code_table("mcg", L)
    s1, c1 = viterbi_tiles(x, w, code, k, L)
    s2, c2 = viterbi_tiles_torch(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(code), k, L)
    assert np.array_equal(s1, s2.numpy())
    np.testing.assert_allclose(c1, c2.numpy(), rtol=1e-5)


@pytest.mark.parametrize("name", list(CODES))
def test_codes_are_roughly_standard_normal(name):
    v = code_table(name, 16)
    assert abs(v.mean()) < 0.01
    assert 0.95 < v.std() < 1.05
    assert code_values(name, np.array([12345]))[0] == v[12345]
