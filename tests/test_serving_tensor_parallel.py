"""Tensor-parallel pieces of packed tensors: the ranks' results, combined as vLLM combines them
(rows concatenated, partial sums added), equal the unsplit kernels; bad splits are refused."""

import pytest
import torch
import torch.nn.functional as F

from ccq import QuantizedTensor, quantize_tensor
from ccq.kernels import qlinear, qmoe
from ccq.serving.tensor_parallel import (
    block_of,
    check_output_split,
    column_piece,
    expert_piece,
    expert_range,
    rank_nbytes,
    row_piece,
    split,
)


def _piece(qt: QuantizedTensor, cut) -> QuantizedTensor:
    return QuantizedTensor.from_state_dict({f: cut(f, t) for f, t in qt.state_dict().items()})


@pytest.fixture(scope="module")
def x():
    return torch.randn(5, 96, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tp", [2, 3, 6])
def test_row_split_sums_to_the_full_product(x, tp):
    qt = quantize_tensor(torch.randn(40, 96), 2, seed=3, L=8)
    assert qt.had_in == 32  # 96 inputs: pieces of 48 (tp=2) or 16 (tp=6) cut Hadamard blocks
    total = torch.zeros(5, 40)
    for r in range(tp):
        cols = split(96, tp, r, block_of(96, 512))
        local = _piece(qt, lambda f, t: row_piece(f, t, cols))
        assert local.trellis.shape[-2] * 16 == cols.stored < 96
        total += qlinear(F.pad(x[:, cols.start:cols.stop], (cols.before, cols.after)), local)
    torch.testing.assert_close(total, qlinear(x, qt), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tp", [2, 4])
def test_column_split_concatenates_to_the_full_product(x, tp):
    qt = quantize_tensor(torch.randn(64, 96), 3, seed=4, L=8)
    parts = []
    for r in range(tp):
        rows = split(64, tp, r)
        parts.append(qlinear(x, _piece(qt, lambda f, t: column_piece(f, t, rows))))
    torch.testing.assert_close(torch.cat(parts, -1), qlinear(x, qt), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp", [2, 4])
def test_experts_split_sums_to_the_full_moe(tp):
    E, H, inter = 4, 48, 96
    g = torch.Generator().manual_seed(1)
    gate_up = quantize_tensor(torch.randn(E, 2 * inter, H, generator=g), 2, seed=5, L=8)
    down = quantize_tensor(torch.randn(E, H, inter, generator=g) * 0.1, 2, seed=6, L=8)
    hidden = torch.randn(7, H, generator=g)
    idx = torch.randint(0, E, (7, 2), generator=g)
    w = torch.rand(7, 2, generator=g)
    total = torch.zeros(7, H)
    for r in range(tp):
        first, n = expert_range(E, tp, r)
        gu, dn = (_piece(qt, lambda f, t: expert_piece(f, t, first, n)) for qt in (gate_up, down))
        assert gu.shape == (n, 2 * inter, H)
        local = idx - first  # the plugin's remapping: other ranks' experts are skipped
        total += qmoe(hidden, torch.where((local >= 0) & (local < n), local, n), w, gu, dn)
    torch.testing.assert_close(total, qmoe(hidden, idx, w, gate_up, down), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="tensor-parallel size 3 does not divide its 4 experts"):
        expert_range(E, 3, 0)


def test_a_split_that_cuts_a_tile_is_refused():
    with pytest.raises(ValueError, match=r"o_proj: tensor-parallel size 4 splits its 72 input columns into pieces "
                                         r"of 18, which cuts a 16x16 tile"):
        split(72, 4, 0, name="o_proj", what="input columns")
    with pytest.raises(ValueError, match="cuts a 16x16 tile"):
        split(100, 3, 1)
    with pytest.raises(ValueError, match="cuts its 64-row output Hadamard block"):
        check_output_split(split(96, 3, 1), 64, "q_proj")
    check_output_split(split(128, 2, 1), 64, "q_proj")  # whole blocks: fine


def test_rank_bytes_match_the_pieces():
    qt = quantize_tensor(torch.randn(40, 96), 2, seed=3, L=8)
    cols = split(96, 2, 1, block_of(96, 512))
    local = _piece(qt, lambda f, t: row_piece(f, t, cols))
    assert rank_nbytes("row", (40, 96), 2, cols) == local.nbytes
    rows = split(64, 4, 2)
    assert rank_nbytes("column", (64, 96), 2, rows) == sum(
        t.numel() * t.element_size() for t in
        {f: column_piece(f, t, rows) for f, t in quantize_tensor(torch.randn(64, 96), 2, L=8).state_dict().items()}.values())
    assert rank_nbytes("replicated", (40, 96), 2, cols) == qt.nbytes


def test_importing_ccq_does_not_load_llvmlite():
    """vLLM's CPU worker (which imports ccq through the plugin) fails at start-up on llvmlite's objects."""
    import subprocess
    import sys

    code = ("import sys, ccq, ccq.kernels, ccq.serving.tensor_parallel; "
            "sys.exit(any(m.split('.')[0] in ('llvmlite', 'numba') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
