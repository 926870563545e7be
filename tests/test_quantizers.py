"""Weight and activation quantizers (docs/methods.md#quantizers)."""

from __future__ import annotations

import pytest
import torch

from search.quant.activation import ActRange, ActStats, calibrate_range, fake_quantize_activation
from search.quant.weight import quantize_weight, weight_levels, weight_sqnr_db


@pytest.fixture
def gaussian():
    return torch.randn(64, 576, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("clip", ["max", "mse"])
def test_uniform_codes_are_symmetric_integers_per_channel(gaussian, bits, clip):
    q = quantize_weight(gaussian, bits, "uniform", clip)
    qmax = 2 ** (bits - 1) - 1
    assert q.codes.dtype == torch.int8 and q.scale.shape == (64,)
    assert int(q.codes.min()) >= -qmax and int(q.codes.max()) <= qmax
    assert torch.equal(q.dequantize(), q.codes.float() * q.scale[:, None])
    if clip == "max":  # the largest weight of every channel lands exactly on the top code
        assert torch.allclose(q.dequantize().abs().amax(1), gaussian.abs().amax(1))


def test_two_bits_is_ternary(gaussian):
    q = quantize_weight(gaussian, 2)
    assert set(q.codes.unique().tolist()) == {-1, 0, 1}


def test_one_bit_is_binary_sign_with_mean_abs_scale():
    w = torch.tensor([[0.5, -1.0, 0.0, 2.5], [-0.1, -0.2, 0.3, 0.0]])
    q = quantize_weight(w, 1)
    assert q.codes.tolist() == [[1, -1, 1, 1], [-1, -1, 1, 1]]  # sign(0) = +1
    assert torch.allclose(q.scale, w.abs().mean(1))


@pytest.mark.parametrize("bits", range(2, 9))
def test_mse_clipping_never_loses_to_max(gaussian, bits):
    def mse(clip):
        return float((quantize_weight(gaussian, bits, "uniform", clip).dequantize() - gaussian).pow(2).mean())

    assert mse("mse") <= mse("max")
    if bits <= 4:  # below ~7 bits clipping helps (seed 000 section 4.3.2)
        assert mse("mse") < 0.9 * mse("max")


def test_power_of_two_levels():
    assert weight_levels(2, "pot").tolist() == [-1.0, 0.0, 1.0]
    assert weight_levels(3, "pot").tolist() == [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]
    assert len(weight_levels(4, "pot")) == 15 and float(weight_levels(4, "pot")[8]) == 2.0**-6


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("scheme", ["pot", "apot"])
def test_codebook_schemes(gaussian, bits, scheme):
    levels = weight_levels(bits, scheme)
    assert len(levels) <= 2**bits and float(levels.max()) == 1.0 and torch.equal(levels, -levels.flip(0))
    q = quantize_weight(gaussian, bits, scheme)
    assert q.codebook is not None and int(q.codes.max()) < len(levels)
    assert torch.equal(q.codebook, levels)
    assert torch.equal(q.dequantize(), levels[q.codes.long()] * q.scale[:, None])


def test_apot_is_denser_than_pot_near_the_top():
    # APoT spreads levels over the range instead of crowding them near zero (Li et al.).
    pot, apot = weight_levels(5, "pot"), weight_levels(5, "apot")
    assert (apot > 0.5).sum() > (pot > 0.5).sum()


def test_weight_sqnr_grows_5_to_6_5_db_per_bit_for_gaussian_weights(gaussian):
    db = [weight_sqnr_db(gaussian, b) for b in range(3, 9)]
    slopes = [b - a for a, b in zip(db, db[1:])]
    assert all(4.8 <= s <= 6.6 for s in slopes), slopes
    fit = (db[-1] - db[0]) / 5
    assert 5.0 <= fit <= 6.5, fit


def _stats(x: torch.Tensor) -> ActStats:
    s = ActStats()
    for chunk in x.split(4096):
        s.update(chunk)
    return s


def test_unsigned_range_after_relu_uses_pact_form():
    x = torch.relu(torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    r = calibrate_range(_stats(x), 4, "minmax")
    assert r.lo == 0.0 and r.zero_point == 0 and r.hi == pytest.approx(float(x.max()))
    alpha = r.hi
    pact = torch.round(x.clamp(0, alpha) * 15 / alpha) * alpha / 15
    assert torch.allclose(fake_quantize_activation(x, r), pact, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_activation_fake_quant_is_bit_identical_to_torchs_op(bits):
    """The kernels quantize inputs as torch.fake_quantize_per_tensor_affine does; the simulation must too."""
    g = torch.Generator().manual_seed(bits)
    for trial in range(12):
        x = torch.randn(4, 8, 33, 17, generator=g) * float(torch.rand(1, generator=g) * 6 + 0.01)
        if trial % 3 == 0:
            x = x.relu()
        lo = 0.0 if trial % 3 == 0 else float(x.min()) * float(torch.rand(1, generator=g) * 0.5 + 0.5)
        hi = float(x.max()) * float(torch.rand(1, generator=g) * 0.5 + 0.5)
        # values exactly on rounding boundaries too: k + 0.5 steps from zero
        r = ActRange(lo, hi, bits)
        x.view(-1)[:64] = (torch.arange(64) - 32 + 0.5) * r.scale
        ref = torch.fake_quantize_per_tensor_affine(x, r.scale, r.zero_point, 0, r.qmax)
        ours = fake_quantize_activation(x, r)
        assert torch.equal(ours, ref), (trial, int((ours != ref).sum()))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_signed_tensors_use_an_affine_map(bits):
    x = torch.randn(20000, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    r = calibrate_range(_stats(x), bits, "minmax")
    assert r.lo < 0 < r.hi and 0 < r.zero_point < r.qmax
    xq = fake_quantize_activation(x, r)
    assert len(xq.unique()) <= 2**bits
    assert (xq - x).abs().max() <= r.scale / 2 + 1e-5  # no clipping with min-max


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_clipped_ranges_beat_min_max_on_long_tails(bits):
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((50000,))
    stats = _stats(x)

    def err(method):
        return float((fake_quantize_activation(x, calibrate_range(stats, bits, method)) - x).pow(2).mean())

    # The MSE range is fitted on a random sample of the tensor, so at 8 bits it can only tie.
    assert err("mse") < err("minmax") * (1.01 if bits == 8 else 0.9)
    if bits <= 4:  # at 8 bits the 0.01% of clipped outliers cost more than the finer steps gain
        assert err("percentile") < err("minmax")


def test_activation_bits_out_of_range_are_refused():
    with pytest.raises(ValueError, match="2..8"):
        calibrate_range(_stats(torch.randn(100)), 1)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_bias_correction_shift_equals_the_conv_of_a_constant_input(groups):
    import torch.nn.functional as F

    from search.quant.bias_correction import output_shift

    torch.manual_seed(0)
    c_in, c_out = 8, 16
    dw = torch.randn(c_out, c_in // groups, 3, 3)
    mean = torch.randn(c_in)
    x = mean.reshape(1, c_in, 1, 1).expand(1, c_in, 5, 5)  # no padding: every position sees the mean
    expected = F.conv2d(x, dw, groups=groups)[0, :, 0, 0]
    assert torch.allclose(output_shift(dw, mean, groups), expected, atol=1e-5)
    dl = torch.randn(c_out, c_in)
    assert torch.allclose(output_shift(dl, mean), dl @ mean, atol=1e-6)
