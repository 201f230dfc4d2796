"""Property-based tests of qcompile.qparams (deterministic hypothesis runs)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qcompile.errors import CalibrationError
from qcompile.qparams import (compute_qparams, dequantize, fake_quantize, qparams_from_tensor, quantize,
                              representable_range, sqnr)
from qcompile.specs import QParams, QuantSpec

FAST = settings(derandomize=True, max_examples=100, deadline=None)


@st.composite
def specs(draw, granularity="per_tensor", axis=None, group_size=None):
    dtype = draw(st.sampled_from([torch.int8, torch.uint8]))
    reduce_range = draw(st.booleans())
    bits = draw(st.integers(3 if reduce_range else 2, 8))
    return QuantSpec(dtype=dtype, bits=bits, symmetric=draw(st.booleans()), narrow=draw(st.booleans()),
                     reduce_range=reduce_range, granularity=granularity, axis=axis, group_size=group_size)


finite32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)


@st.composite
def tensors(draw, shape):
    """Random data of ``shape``: drawn magnitude, seed, with exact zeros and an optional zero slice."""
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    mag = 10.0 ** draw(st.integers(-5, 3))
    offset = draw(st.sampled_from([0.0, 1.0, -1.0, 3.0]))
    x = (torch.randn(shape, generator=g) + offset) * mag
    x = torch.where(torch.rand(shape, generator=g) < 0.1, torch.zeros(()), x)
    if draw(st.booleans()):
        x.view(-1)[: max(1, x.numel() // 4)] = 0.0
    return x


def _tol(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return scale * (0.5 + 2e-5) + x.abs() * 1e-6 + 1e-30


def _per_element(param: torch.Tensor, x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Independent broadcast of a per-channel / per-group parameter to x's shape."""
    if qp.axis is not None:
        ax = qp.axis % x.dim()
        return param.reshape(-1)[torch.arange(x.shape[ax])].reshape(
            [-1 if i == ax else 1 for i in range(x.dim())]).expand_as(x).to(torch.float64)
    if qp.group_size is not None:
        cols = torch.arange(x.shape[-1]) // qp.group_size
        return param.reshape(*x.shape[:-1], -1)[..., cols].to(torch.float64)
    return param.to(torch.float64).expand_as(x)


def _check_roundtrip(x: torch.Tensor, qp: QParams) -> None:
    s = _per_element(qp.scale, x, qp)
    fq = fake_quantize(x, qp)
    err = (fq.double() - x.double()).abs()
    assert bool((err <= _tol(s, x.double())).all()), f"max err {err.max()} vs scale {s.max()}"
    q = quantize(x, qp)
    assert q.dtype == qp.dtype
    assert int(q.min()) >= qp.quant_min and int(q.max()) <= qp.quant_max
    assert torch.equal(dequantize(q, qp), fq), "fake_quantize != dequantize(quantize)"
    zero = torch.zeros_like(x)
    assert bool((fake_quantize(zero, qp) == 0).all()), "0.0 is not exactly representable"


@FAST
@given(spec=specs(), values=st.lists(finite32, min_size=1, max_size=40), exp=st.integers(-6, 3))
def test_per_tensor_roundtrip_and_zero(spec, values, exp):
    x = torch.tensor(values, dtype=torch.float32) * (10.0**exp)
    qp = qparams_from_tensor(x, spec)
    assert qp.scale.dtype == torch.float32 and qp.zero_point.dtype in (torch.int32, torch.int64)
    assert qp.scale.dim() == 0 and qp.per_tensor
    assert float(qp.scale) >= torch.finfo(torch.float32).eps
    assert qp.quant_min <= int(qp.zero_point) <= qp.quant_max
    _check_roundtrip(x, qp)


@FAST
@given(spec=specs(), values=st.lists(finite32, min_size=1, max_size=20),
       frac=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20))
def test_grid_points_inside_representable_range(spec, values, frac):
    qp = qparams_from_tensor(torch.tensor(values), spec)
    rlo, rhi = representable_range(qp)
    x = (rlo + (rhi - rlo) * torch.tensor(frac, dtype=torch.float64)).to(torch.float32)
    _check_roundtrip(x, qp)


@FAST
@given(spec=specs(), values=st.lists(finite32, min_size=1, max_size=20), beyond=st.floats(1.0, 1e3))
def test_values_outside_range_clamp(spec, values, beyond):
    qp = qparams_from_tensor(torch.tensor(values), spec)
    rlo, rhi = representable_range(qp)
    s = float(qp.scale)
    x = torch.tensor([float(rhi) + s * beyond, float(rlo) - s * beyond, 3e38, -3e38])
    q = quantize(x, qp)
    assert q.tolist() == [qp.quant_max, qp.quant_min, qp.quant_max, qp.quant_min]
    fq = fake_quantize(x, qp)
    assert torch.allclose(fq.double(), torch.stack([rhi, rlo, rhi, rlo]), rtol=1e-6, atol=0)


@FAST
@given(data=st.data(), ndim=st.integers(1, 4))
def test_per_channel_any_axis(data, ndim):
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = data.draw(st.integers(-ndim, ndim - 1))
    spec = data.draw(specs("per_channel", axis=axis))
    x = data.draw(tensors(shape))
    if data.draw(st.booleans()):  # an all-zero channel
        x.select(axis, 0).zero_()
    qp = qparams_from_tensor(x, spec)
    assert qp.axis == axis and qp.scale.shape == (shape[axis],) and qp.zero_point.shape == (shape[axis],)
    assert bool(torch.isfinite(qp.scale).all())
    _check_roundtrip(x, qp)
    pos = QParams(qp.scale, qp.zero_point, qp.quant_min, qp.quant_max, qp.dtype, axis=axis % ndim)
    assert torch.equal(fake_quantize(x, pos), fake_quantize(x, qp))


@FAST
@given(data=st.data())
def test_per_group(data):
    rows, cols = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 40))
    group = data.draw(st.integers(1, 16))
    spec = data.draw(specs("per_group", group_size=group))
    x = data.draw(tensors((rows, cols)))
    qp = qparams_from_tensor(x, spec)
    assert qp.group_size == group and qp.axis is None
    assert qp.scale.shape == (rows, math.ceil(cols / group))
    _check_roundtrip(x, qp)
    flat = QParams(qp.scale.flatten(), qp.zero_point.flatten(), qp.quant_min, qp.quant_max, qp.dtype,
                   group_size=group)
    assert torch.equal(fake_quantize(x, flat), fake_quantize(x, qp))


@FAST
@given(spec=specs(), lo=finite32, hi=finite32)
def test_zero_in_range_and_dtype(spec, lo, hi):
    qp = compute_qparams(torch.tensor(min(lo, hi)), torch.tensor(max(lo, hi)), spec)
    rlo, rhi = representable_range(qp)
    assert float(rlo) <= 0.0 <= float(rhi)
    assert float(fake_quantize(torch.tensor(0.0), qp)) == 0.0
    assert qp.dtype == spec.dtype and (qp.quant_min, qp.quant_max) == (spec.quant_min, spec.quant_max)


def test_symmetric_formulas():
    amax = torch.tensor(2.54)
    narrow = compute_qparams(-amax, amax * 0.5, QuantSpec(dtype=torch.int8, symmetric=True, narrow=True))
    assert int(narrow.zero_point) == 0 and math.isclose(float(narrow.scale), 2.54 / 127, rel_tol=1e-6)
    full = compute_qparams(-amax, amax, QuantSpec(dtype=torch.int8, symmetric=True))
    assert int(full.zero_point) == 0 and math.isclose(float(full.scale), 2.54 / 127.5, rel_tol=1e-6)
    u8 = compute_qparams(torch.tensor(0.0), amax, QuantSpec(dtype=torch.uint8, symmetric=True))
    assert int(u8.zero_point) == 128 and math.isclose(float(u8.scale), 2.54 / 127.5, rel_tol=1e-6)
    u7 = compute_qparams(torch.tensor(0.0), amax, QuantSpec(dtype=torch.uint8, symmetric=True, reduce_range=True))
    assert (u7.quant_min, u7.quant_max, int(u7.zero_point)) == (0, 127, 64)


def test_affine_formula_and_positive_range():
    qp = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), QuantSpec(dtype=torch.uint8))
    assert math.isclose(float(qp.scale), 4.0 / 255, rel_tol=1e-6) and int(qp.zero_point) == 64
    pos = compute_qparams(torch.tensor(2.0), torch.tensor(5.0), QuantSpec(dtype=torch.uint8))
    assert int(pos.zero_point) == 0 and math.isclose(float(pos.scale), 5.0 / 255, rel_tol=1e-6)
    neg = compute_qparams(torch.tensor(-5.0), torch.tensor(-2.0), QuantSpec(dtype=torch.int8))
    assert int(neg.zero_point) == 127


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_all_zero_range_is_sane(symmetric, dtype):
    spec = QuantSpec(dtype=dtype, symmetric=symmetric, granularity="per_channel", axis=0)
    qp = compute_qparams(torch.zeros(3), torch.zeros(3), spec)
    assert torch.equal(qp.scale, torch.ones(3))
    assert bool((fake_quantize(torch.zeros(3, 4), qp) == 0).all())
    tiny = compute_qparams(torch.tensor(0.0), torch.tensor(1e-20), QuantSpec(dtype=dtype, symmetric=symmetric))
    assert float(tiny.scale) == torch.finfo(torch.float32).eps


def test_non_finite_range_raises():
    with pytest.raises(CalibrationError):
        compute_qparams(torch.tensor(float("nan")), torch.tensor(1.0), QuantSpec())


def test_int32_bias_quantization_is_exact():
    spec = QuantSpec(dtype=torch.int32, bits=32, symmetric=True)
    qp = compute_qparams(torch.tensor(-1e3), torch.tensor(1e3), spec)
    assert (qp.quant_min, qp.quant_max) == (-(2**31), 2**31 - 1)
    x = torch.tensor([1e3, -1e3, 123.456, 0.0, 1e-3, -7.25])
    q = quantize(x, qp)
    assert q.dtype == torch.int32
    expected = torch.round(x.double() / qp.scale.double()).clamp(qp.quant_min, qp.quant_max).to(torch.int64)
    assert torch.equal(q.to(torch.int64), expected)


def test_per_token_keepdim_broadcast_and_half_precision():
    spec = QuantSpec(dtype=torch.int8, symmetric=True, granularity="per_token")
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    qp = qparams_from_tensor(x, spec)
    assert qp.scale.shape == (3, 5, 1) and qp.per_tensor
    assert bool(((fake_quantize(x, qp) - x).abs() <= qp.scale * 0.5 + 1e-6).all())
    half = fake_quantize(x.half(), qparams_from_tensor(x, QuantSpec()))
    assert half.dtype == torch.float16


def test_sqnr():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100_000, generator=g) * 2 - 1
    assert sqnr(x, x) == math.inf
    assert sqnr(x, torch.zeros_like(x)) == pytest.approx(0.0)
    noise = torch.randn(100_000, generator=g) * 0.01
    assert sqnr(x, x + noise) == pytest.approx(sqnr(10 * x, 10 * (x + noise)), rel=1e-6)
    assert sqnr(x, x + noise) > sqnr(x, x + 2 * noise)
    assert sqnr(torch.zeros(3), torch.ones(3)) == -math.inf
    qp = qparams_from_tensor(x, QuantSpec(dtype=torch.int8, symmetric=True, narrow=True))
    assert sqnr(x, fake_quantize(x, qp)) == pytest.approx(10 * math.log10(4 / (2 / 254) ** 2), abs=0.3)


def test_round_half_to_even():
    spec = QuantSpec(dtype=torch.int8, symmetric=True, narrow=True)
    qp = compute_qparams(torch.tensor(-1.0), torch.tensor(1.0), spec)
    s = float(qp.scale)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], dtype=torch.float64) * s
    assert quantize(x, qp).tolist() == [0, 2, 2, 0, -2, -2]
