"""FakeQuantize: forward on the converted grid, straight-through and LSQ gradients, controls, state."""
import pytest
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers quantized_decomposed ops

from qcompile.errors import CalibrationError, ConfigError
from qcompile.fake_quant import FakeQuantize, lsq_fake_quantize, lsq_grad_factor, make_fake_quant
from qcompile.qparams import compute_qparams, dequantize, quantize
from qcompile.specs import QuantSpec

qd = torch.ops.quantized_decomposed
ACT = QuantSpec()  # uint8 affine per tensor
W4 = QuantSpec(dtype=torch.int8, bits=4, symmetric=True, granularity="per_channel", axis=0)


def _act_fq(lo=-1.0, hi=3.0, **kw) -> FakeQuantize:
    fq = make_fake_quant(ACT, "act", **kw)
    fq.train()
    fq(torch.tensor([lo, hi]))  # first observation: the range is taken as is
    return fq


def _reference_qdq(x, fq):
    qp = fq.calculate_qparams()
    s, z = float(qp.scale), int(qp.zero_point)
    return qd.dequantize_per_tensor(qd.quantize_per_tensor(x, s, z, qp.quant_min, qp.quant_max, qp.dtype),
                                    s, z, qp.quant_min, qp.quant_max, qp.dtype)


@pytest.mark.parametrize("learn_scale", [False, True])
def test_ste_passes_gradient_inside_the_range_and_zeroes_it_outside(learn_scale):
    fq = _act_fq(learn_scale=learn_scale).eval()
    qp = fq.calculate_qparams()
    assert qp.scale.item() == pytest.approx(4.0 / 255) and qp.zero_point.item() == 64
    x = torch.tensor([-3.0, -1.2, -0.5, 0.0, 0.7, 2.9, 3.2, 10.0], requires_grad=True)
    y = fq(x)
    y.backward(torch.ones_like(y))
    # -1.2 and 3.2 round outside [q_min, q_max] (the grid spans [-1.0039, 2.9961]): clamped, gradient 0
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert torch.equal(y.detach(), _reference_qdq(x.detach(), fq))  # the reference graph's numbers exactly


def test_per_channel_weight_ste_mask_and_grid():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    fq = make_fake_quant(W4, "w", weight=w)
    qp = fq.calculate_qparams()
    assert (qp.quant_min, qp.quant_max, qp.axis) == (-8, 7, 0)
    torch.testing.assert_close(qp.scale, w.abs().amax((1, 2, 3)) / 7.5)
    wide = (w * 1.5).requires_grad_()
    fq.disable_observer()  # keep the range of w; 1.5 * w overflows it
    out = fq(wide)
    out.sum().backward()
    codes = torch.round(wide.detach() / qp.scale.view(-1, 1, 1, 1))
    inside = (codes >= -8) & (codes <= 7)
    assert 0 < inside.float().mean() < 1
    assert torch.equal(wide.grad, inside.float())
    assert torch.equal(out.detach(), dequantize(quantize(out.detach(), qp), qp))  # values on the int grid


def _lsq_surrogate(x, s, s0, zp, bounds):
    """LSQ's function of the scale: the rounding residuals and the clamp decisions frozen at ``s0``
    (exactly what the straight-through estimator differentiates); smooth in ``s`` around ``s0``."""
    code = torch.round(x / s0) + zp
    inside = (code >= bounds[0]) & (code <= bounds[1])
    q = torch.where(inside, x / s + (torch.round(x / s0) - x / s0) + zp, torch.clamp(code, *bounds))
    return (q - zp) * s


@pytest.mark.parametrize("zp", [0.0, 3.0])
def test_lsq_scale_gradient_matches_finite_difference(zp):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, dtype=torch.float64, generator=g) * 2.0
    c = torch.randn(4000, dtype=torch.float64, generator=g)
    s0, bounds, factor = 0.11, (-8, 7), lsq_grad_factor(4000, 7)
    scale = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    loss = (c * lsq_fake_quantize(x, scale, torch.tensor(zp), bounds, grad_factor=factor)).sum()
    loss.backward()
    h = 1e-7
    f = lambda s: float((c * _lsq_surrogate(x, torch.tensor(s, dtype=torch.float64), s0, zp, bounds)).sum())
    fd = (f(s0 + h) - f(s0 - h)) / (2 * h)
    assert abs(fd) > 1.0  # a real signal, not 0 == 0
    assert scale.grad.item() == pytest.approx(factor * fd, rel=1e-6)
    # and the same as PyTorch's own LSQ kernel
    s32 = torch.tensor([s0], requires_grad=True)
    y = torch._fake_quantize_learnable_per_tensor_affine(x.float(), s32, torch.tensor([zp]), *bounds, factor)
    (c.float() * y).sum().backward()
    assert scale.grad.item() == pytest.approx(s32.grad.item(), rel=1e-3)


def test_lsq_per_channel_scale_gradient_matches_finite_difference():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 50, dtype=torch.float64, generator=g)
    c = torch.randn(4, 50, dtype=torch.float64, generator=g)
    s0 = torch.tensor([0.1, 0.2, 0.05, 0.3], dtype=torch.float64)
    scale = s0.clone().requires_grad_()
    (c * lsq_fake_quantize(w, scale, torch.zeros(4), (-8, 7), axis=0)).sum().backward()
    h = 1e-7
    for ch in range(4):
        def f(delta):
            s = s0.clone()
            s[ch] += delta
            return float((c * _lsq_surrogate(w, s.view(-1, 1), s0.view(-1, 1), 0.0, (-8, 7))).sum())
        assert scale.grad[ch].item() == pytest.approx((f(h) - f(-h)) / (2 * h), rel=1e-6, abs=1e-9)


def test_lsq_forward_equals_the_reference_grid_and_learns():
    torch.manual_seed(0)
    fq = _act_fq(-2.0, 6.0, learn_scale=True)
    assert isinstance(fq.scale, torch.nn.Parameter)
    x = torch.randn(10000) * 3
    with torch.no_grad():
        fq.scale.mul_(0.9137)  # a learned value: convert must use it, not a recomputed one
    y = fq(x)
    assert torch.equal(y.detach(), _reference_qdq(x, fq))
    y.square().sum().backward()
    assert fq.scale.grad is not None and fq.scale.grad.abs().item() > 0
    fq.freeze()
    assert not fq(x).requires_grad  # frozen: the scale is used detached, nothing to learn
    fq.freeze(False)
    assert fq(x).requires_grad


def test_moving_average_ranges_only_in_training():
    fq = _act_fq(-1.0, 3.0)
    fq(torch.tensor([-3.0, 5.0]))
    c = ACT.averaging_constant
    assert fq.min_val.item() == pytest.approx(-1.0 + c * (-3.0 + 1.0))
    assert fq.max_val.item() == pytest.approx(3.0 + c * (5.0 - 3.0))
    qp = compute_qparams(fq.min_val, fq.max_val, ACT)
    assert fq.calculate_qparams().scale.item() == qp.scale.item()
    before = fq.state_dict()
    fq.eval()
    fq(torch.tensor([-50.0, 50.0]))  # eval: no observation
    assert all(torch.equal(before[k], v) for k, v in fq.state_dict().items())
    fq.train().disable_observer()
    fq(torch.tensor([-50.0, 50.0]))  # observer disabled: no observation either
    assert all(torch.equal(before[k], v) for k, v in fq.state_dict().items())


def test_weight_fake_quant_follows_the_current_weight_in_any_mode():
    w = torch.randn(4, 8)
    fq = make_fake_quant(W4, "w", weight=w).eval()
    fq(w * 2)
    torch.testing.assert_close(fq.calculate_qparams().scale, (w * 2).abs().amax(1) / 7.5)
    fq.disable_observer()
    fq(w)
    torch.testing.assert_close(fq.calculate_qparams().scale, (w * 2).abs().amax(1) / 7.5)


def test_disable_fake_quant_is_identity_and_errors_are_actionable():
    fq = make_fake_quant(ACT, "layer1.relu")
    x = torch.randn(5)
    with pytest.raises(CalibrationError, match="layer1.relu"):
        fq.calculate_qparams()
    with pytest.raises(CalibrationError, match="no range yet"):
        fq.eval()(x)
    fq.disable_fake_quant()
    assert torch.equal(fq(x), x)
    with pytest.raises(ConfigError, match="per_tensor and per_channel"):
        FakeQuantize(QuantSpec(dtype=torch.int8, granularity="per_group", group_size=32))
    with pytest.raises(ConfigError, match="channels"):
        FakeQuantize(W4)
    with pytest.raises(CalibrationError, match="NaN"):
        fq.train()(torch.tensor([float("nan")]))


def test_state_dict_round_trip_restores_ranges_scales_and_switches():
    torch.manual_seed(0)
    w = torch.randn(6, 4)
    src = make_fake_quant(W4, "w", learn_scale=True, weight=w)
    with torch.no_grad():
        src.scale.mul_(1.1)
    src.freeze()
    dst = make_fake_quant(W4, "w", learn_scale=True, weight=torch.randn(6, 4))
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst(w), src(w))
    assert not dst.observer_enabled.item() and dst.frozen.item()
    assert set(src.state_dict()) == {"scale", "zero_point", "min_val", "max_val", "observer_enabled",
                                     "fake_quant_enabled", "initialized", "frozen"}
