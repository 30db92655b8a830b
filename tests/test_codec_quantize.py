"""quantize_tensor: quality, Hessian-aware rounding, incoherence, format, determinism, errors."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import ccq
from ccq.codec import packed_nbytes
from ccq.codec.reference import decode, decode_rotated


def _np(d):
    return {k: v.numpy() for k, v in d.items()}


@pytest.mark.parametrize("bits,bound", [(2, 0.0705), (3, 0.0185), (4, 0.0048)])
def test_gaussian_mse_bounds(bits, bound):
    w = torch.randn(128, 128, generator=torch.Generator().manual_seed(0))
    qt = ccq.quantize_tensor(w, bits)
    mse = float(((qt.dequantize() - w) ** 2).mean())
    assert mse <= bound
    assert qt.dequantize().shape == w.shape


def test_bits_per_weight_counts_every_byte():
    qt = ccq.quantize_tensor(torch.randn(64, 96), 3, L=8)
    expected = (64 * 96 * 3 // 8 + 64 * 2 + 96 * 1 + 9 * 4) * 8 / (64 * 96)
    assert qt.bits_per_weight == pytest.approx(expected)
    for shape, ro in (((64, 96), False), ((2, 37, 50), True)):
        q = ccq.quantize_tensor(torch.randn(shape), 2, L=8, rotate_output=ro)
        assert packed_nbytes(shape, 2, ro) == q.nbytes


def test_numpy_reference_decoder_matches_torch():
    w = torch.randn(2, 40, 50)
    for ro, code in ((False, "mul1"), (True, "3inst")):
        qt = ccq.quantize_tensor(w, 3, L=10, rotate_output=ro, code=code)
        d = _np(qt.state_dict())
        assert np.array_equal(decode_rotated(d), qt.rotated_weight().numpy())  # bit-exact
        np.testing.assert_allclose(decode(d), qt.dequantize().numpy(), atol=1e-5)


def test_same_seed_same_bytes_and_seed_matters():
    w = torch.randn(48, 64)
    a = ccq.quantize_tensor(w, 2, L=8, seed=7).state_dict()
    b = ccq.quantize_tensor(w, 2, L=8, seed=7).state_dict()
    c = ccq.quantize_tensor(w, 2, L=8, seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["signs_in"], c["signs_in"])


def test_state_dict_round_trip_through_safetensors(tmp_path):
    qt = ccq.quantize_tensor(torch.randn(3, 32, 48), 4, L=8, rotate_output=True)
    save_file(qt.state_dict(), tmp_path / "t.safetensors")
    back = ccq.QuantizedTensor.from_state_dict(load_file(tmp_path / "t.safetensors"))
    assert back.shape == (3, 32, 48) and back.bits == 4 and back.L == 8
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert all(torch.equal(back.state_dict()[k], v) for k, v in qt.state_dict().items())


def test_padding_of_odd_shapes():
    w = torch.randn(37, 50)
    qt = ccq.quantize_tensor(w, 4, L=8)
    assert qt.trellis.shape == (3, 4, 64)
    assert qt.dequantize().shape == (37, 50)
    assert float(((qt.dequantize() - w) ** 2).mean()) < 0.02


def _correlated_hessian(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 0.9 * torch.randn(n, n, generator=g) / n ** 0.5
    x = torch.randn(4 * n, n, generator=g) @ mix * torch.linspace(0.2, 3.0, n)
    return x.T @ x / x.shape[0]


def test_ldlq_beats_data_free_on_correlated_hessian():
    h = _correlated_hessian(128)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    free = ccq.quantize_tensor(w, 2, L=10)
    ldlq = ccq.quantize_tensor(w, 2, hessian=h, L=10)
    loss_free = ccq.proxy_loss(w, free.dequantize(), h)
    loss_ldlq = ccq.proxy_loss(w, ldlq.dequantize(), h)
    assert loss_ldlq < 0.8 * loss_free


def test_stack_with_per_expert_hessians():
    w = torch.randn(2, 32, 64)
    h = torch.stack([_correlated_hessian(64, s) for s in (1, 2)])
    qt = ccq.quantize_tensor(w, 3, hessian=h, L=8)
    shared = ccq.quantize_tensor(w, 3, hessian=h[0], L=8)
    assert qt.shape == (2, 32, 64) and shared.shape == (2, 32, 64)
    assert ccq.proxy_loss(w, qt.dequantize(), h) < ccq.proxy_loss(w, ccq.quantize_tensor(w, 3, L=8).dequantize(), h)


def test_incoherence_lowers_error_on_outliers():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g)
    w[:, 5] *= 25.0  # an outlier input column
    w[7, :] *= 8.0  # an outlier row
    w[3, 40] = 60.0
    plain = ccq.quantize_tensor(w, 2, L=8, hadamard_block=1)
    rotated = ccq.quantize_tensor(w, 2, L=8)
    assert rotated.had_in == 128 and plain.had_in == 1
    err = lambda q: float(((q.dequantize() - w) ** 2).mean())  # noqa: E731
    assert err(rotated) < 0.7 * err(plain)


@pytest.mark.parametrize(
    "weight,kwargs,match",
    [
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), {}, r"non-finite value \(nan\) at index \(0, 1\)"),
        (torch.randn(4), {}, "must be 2-D"),
        (torch.randn(2, 2, 2, 2), {}, "must be 2-D"),
        (torch.randn(4, 4), {"bits": 5}, "bits must be 2, 3 or 4"),
        (torch.randn(4, 4), {"bits": 1}, "bits must be 2, 3 or 4"),
        (torch.randn(4, 4), {"code": "nope"}, "unknown trellis code"),
        (torch.randn(4, 4), {"hessian": torch.eye(5)}, "hessian shape"),
        (torch.randn(4, 4), {"hessian": torch.full((4, 4), float("inf"))}, "hessian has a non-finite"),
        (torch.randn(4, 4), {"L": 20}, "L must be"),
    ],
)
def test_bad_input_raises_clear_errors(weight, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ccq.quantize_tensor(weight, **kwargs)


def test_unknown_format_version_is_refused():
    d = ccq.quantize_tensor(torch.randn(16, 16), 2, L=8).state_dict()
    d["meta"] = d["meta"].clone()
    d["meta"][0] = 99
    with pytest.raises(ValueError, match="format version 99"):
        ccq.QuantizedTensor.from_state_dict(d)
