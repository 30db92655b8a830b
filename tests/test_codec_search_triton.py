"""The Triton trellis search against the numba search, bit for bit, in Triton's interpreter
(short sequences and small L keep it fast), and the CCQ_SEARCH backend switch."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernel's first import
pytest.importorskip("triton")

import ccq  # noqa: E402
from ccq.codec.codes import code_table  # noqa: E402
from ccq.codec.quantizer import _Searcher, search_backend  # noqa: E402
from ccq.codec.viterbi_numba import viterbi_tiles  # noqa: E402
from ccq.codec.viterbi_triton import viterbi_tiles_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _both(k, L, code, n, T, seed, vec_n=None, ties=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, T)).astype(np.float32)
    w = rng.uniform(0.25, 4.0, (n, T)).astype(np.float32)
    if ties:  # repeated targets and unit weights: many equal path costs
        x = np.round(x * 2) / 2
        w[:] = 1.0
    s1, c1 = viterbi_tiles(x, w, code_table(code, L), k, L)
    s2, c2 = viterbi_tiles_triton(torch.from_numpy(x).to(DEV), torch.from_numpy(w).to(DEV), code, k, L, vec_n=vec_n)
    return s1, c1, s2.cpu().numpy(), c2.cpu().numpy()


@pytest.mark.parametrize("k,L,code,T", [(2, 8, "1mad", 64), (3, 10, "mcg", 32), (4, 12, "3inst", 16)])
def test_triton_search_matches_numba_bit_for_bit(k, L, code, T):
    s1, c1, s2, c2 = _both(k, L, code, 2, T, seed=k * 10 + L)
    assert np.array_equal(s1, s2)
    assert np.array_equal(c1, c2)  # the same float operations in the same order


def test_gpu_layout_matches_numba():
    """vec_n=False is the register layout the GPU runs (one tensor per successor bit pattern)."""
    s1, c1, s2, c2 = _both(2, 8, "mul1", 1, 32, seed=5, vec_n=False)
    assert np.array_equal(s1, s2) and np.array_equal(c1, c2)


def test_ties_break_like_numba():
    s1, c1, s2, c2 = _both(2, 8, "mul1", 2, 32, seed=7, ties=True)
    assert np.array_equal(s1, s2) and np.array_equal(c1, c2)


def test_triton_search_obeys_tail_biting():
    k, L = 3, 10
    _, _, states, cost = _both(k, L, "mul1", 2, 32, seed=3)
    low = (1 << (L - k)) - 1
    assert np.all((states >> k) == (np.roll(states, 1, axis=1) & low))


def test_ccq_search_selects_backend(monkeypatch):
    monkeypatch.delenv("CCQ_SEARCH", raising=False)
    assert search_backend(torch.device("cpu")) == "numba"
    assert search_backend(torch.device("cuda")) == "triton"
    for name in ("numba", "triton", "torch"):
        monkeypatch.setenv("CCQ_SEARCH", name.upper())
        assert search_backend(torch.device("cpu")) == name
    monkeypatch.setenv("CCQ_SEARCH", "cuda")
    with pytest.raises(ValueError, match="CCQ_SEARCH must be one of numba, triton, torch, got 'cuda'"):
        ccq.quantize_tensor(torch.randn(16, 16), 2, L=8, device="cpu")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("CCQ_SEARCH", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _Searcher(ccq.TrellisConfig(bits=2, L=8), torch.device("cpu"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_searcher_backends_give_numba_states(monkeypatch, backend):
    """The quantizer's search object with each forced backend, on a batch of short tiles."""
    cfg = ccq.TrellisConfig(bits=2, L=8)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    w = torch.rand(3, 32, generator=torch.Generator().manual_seed(5)) + 0.5
    monkeypatch.setenv("CCQ_SEARCH", "numba")
    ref = _Searcher(cfg, torch.device(DEV))(x, w)
    monkeypatch.setenv("CCQ_SEARCH", backend)
    assert torch.equal(_Searcher(cfg, torch.device(DEV))(x, w), ref)
