"""Fake-quantization for quantization-aware training (QAT).

A :class:`FakeQuantize` module rounds its input to the grid of a frozen :class:`~qcompile.specs.QuantSpec`
and returns real values (``(clamp(round(x * (1/s)) + zp) - zp) * s``), so training sees the quantization
error.
Like an observer it sits in the graph as a ``call_module`` node, and ``calculate_qparams()`` returns the
:class:`~qcompile.specs.QParams` that convert bakes into the reference graph; the fake-quant forward and
the converted model therefore use the same numbers.

Gradients
---------
* Straight-through estimator (STE): ``d out / d x`` is 1 where ``x`` lands inside the grid and 0 where it
  is clamped. Per tensor: PyTorch's fused ``fake_quantize_per_tensor_affine`` kernel; per channel and LSQ:
  ``_FakeQuantFn``. Both round ``x * (1/s)`` like the reference graph's ``quantize_per_tensor``; convert
  stores a weight as its fake-quantized value, so its integers are the ones training saw.
* ``learn_scale=True`` (LSQ, Esser et al. 2020): the scale is an ``nn.Parameter`` with gradient
  ``round(x/s) - x/s`` inside the grid and ``q_min - zp`` / ``q_max - zp`` where clamped, multiplied by
  ``grad_factor`` (default ``1 / sqrt(numel_per_scale * q_max)``, the paper's choice). The zero point stays
  fixed at its initial value (symmetric weights have none; LSQ+ offsets are not implemented).

Ranges
------
Activations: exponential moving average of each training batch's min / max (``spec.averaging_constant``,
the first batch taken as is), only in training mode. Weights (``weight=True``): min / max of the current
weight every time the module runs (weights are not data, so eval mode observes too). A learned scale is
initialised from the first observation, then only training changes it.

Controls: ``enable_observer`` / ``disable_observer`` (freeze ranges), ``enable_fake_quant`` /
``disable_fake_quant`` (identity), ``freeze()`` (observer off and, with LSQ, the scale gets no gradient).
All state (ranges, scale, zero point, switches) is in ``state_dict`` so training can be resumed.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .errors import CalibrationError, ConfigError
from .qparams import compute_qparams
from .specs import QParams, QuantSpec

__all__ = ["FakeQuantize", "make_fake_quant", "ste_fake_quantize", "lsq_fake_quantize", "lsq_grad_factor"]

_EPS = torch.finfo(torch.float32).eps


def _broadcast_shape(x: Tensor, axis: int | None) -> list[int]:
    if axis is None:
        return []
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return shape


class _FakeQuantFn(torch.autograd.Function):
    """``(clamp(round(x * (1/s)) + zp) - zp) * s`` as in-place tensor ops, with the STE for ``x`` and, when
    the scale needs a gradient, LSQ's: ``round(v) - v`` inside the grid, ``clamp - zp`` outside (``v = x/s``).
    One saved mask (plus one tensor for LSQ) instead of autograd's chain of elementwise nodes; PyTorch's
    per-channel kernel computes the same values but is not vectorised on CPU."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis, bounds, grad_factor):
        shape = _broadcast_shape(x, axis)
        s = scale.clamp_min(_EPS).to(x.dtype)
        s = s.reshape(shape) if shape else s
        v = torch.mul(x, 1.0 / s)
        q = torch.round(v)
        if zero_point is not None:  # None: a zero point known to be 0 (symmetric signed), two passes saved
            zp = zero_point.to(x.dtype)
            zp = zp.reshape(shape) if shape else zp
            q.add_(zp)
        inside = (q >= bounds[0]).logical_and_(q <= bounds[1])
        q.clamp_(*bounds)
        if zero_point is not None:
            q.sub_(zp)  # integer offsets from the zero point
        ctx.scale_shape, ctx.axis, ctx.grad_factor = scale.shape, axis, grad_factor
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(inside, torch.where(inside, q - v, q), scale >= _EPS)
        else:
            ctx.save_for_backward(inside)
        return q.mul_(s)

    @staticmethod
    def backward(ctx, grad):
        inside, *lsq = ctx.saved_tensors
        grad_scale = None
        if lsq:
            local, scale_ok = lsq
            g = grad * local
            if ctx.axis is None:
                g = g.sum()
            else:
                axis = ctx.axis % g.dim()
                g = g.sum([d for d in range(g.dim()) if d != axis])
            grad_scale = (g * ctx.grad_factor * scale_ok).reshape(ctx.scale_shape).to(grad.dtype)
        return grad * inside, grad_scale, None, None, None, None


def ste_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, quant_min: int, quant_max: int,
                      axis: int | None = None) -> Tensor:
    """Fake-quantize with the straight-through estimator (float32): ``(clamp(round(x * (1/s)) + zp) - zp) * s``,
    gradient 1 inside the grid and 0 where clamped. ``zero_point=None``: zero."""
    if axis is None:
        zp = zero_point if zero_point is not None else torch.zeros((), dtype=torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, scale.float(), zp.to(torch.int32), quant_min, quant_max)
    return _FakeQuantFn.apply(x, scale.detach().float(), zero_point, axis, (quant_min, quant_max), 1.0)


def lsq_grad_factor(numel_per_scale: int, quant_max: int) -> float:
    """LSQ's scale-gradient factor ``1 / sqrt(N * Q_P)``."""
    return 1.0 / math.sqrt(max(numel_per_scale, 1) * max(quant_max, 1))


def lsq_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, bounds: tuple[int, int],
                      axis: int | None = None, grad_factor: float = 1.0) -> Tensor:
    """Fake-quantize to ``bounds = (quant_min, quant_max)`` with the STE for ``x`` and, when ``scale``
    requires grad, LSQ's scale gradient times ``grad_factor`` (a scale below float32's eps is clamped and
    gets no gradient). Same values as :func:`ste_fake_quantize` and the reference graph's quantize /
    dequantize; any float dtype (float64 for gradient checks)."""
    return _FakeQuantFn.apply(x, scale, zero_point, axis, bounds, grad_factor)


class FakeQuantize(nn.Module):
    """Fake-quantize one tensor to ``spec``'s grid (see the module docstring).

    spec         the frozen QuantSpec (per_tensor, or per_channel along ``spec.axis``)
    name         where it sits (graph node / module path), for error messages
    learn_scale  LSQ: the scale is a trained parameter, initialised from the first observation
    channels     number of channels of a per_channel spec (state shapes are fixed up front for resume)
    weight       ranges from the current tensor (weights) instead of a moving average (activations)
    """

    def __init__(self, spec: QuantSpec, name: str = "<unnamed>", *, learn_scale: bool = False,
                 channels: int | None = None, weight: bool = False):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise ConfigError(f"FakeQuantize needs a QuantSpec, got {type(spec).__name__}")
        if spec.granularity not in ("per_tensor", "per_channel"):
            raise ConfigError(f"{name!r}: QAT fake-quantization handles per_tensor and per_channel specs, "
                              f"got {spec.granularity!r}")
        if spec.granularity == "per_channel" and not channels:
            raise ConfigError(f"{name!r}: a per_channel FakeQuantize needs channels=<number of channels>")
        self.spec, self.name, self.learn_scale, self.weight = spec, name, learn_scale, weight
        self.axis = spec.axis if spec.granularity == "per_channel" else None
        shape = (channels,) if self.axis is not None else ()
        zp0 = compute_qparams(torch.zeros(shape), torch.zeros(shape), spec).zero_point
        scale = torch.ones(shape)
        if learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp0.to(torch.int32))
        self.register_buffer("min_val", torch.zeros(shape))
        self.register_buffer("max_val", torch.zeros(shape))
        for flag, on in (("observer_enabled", 1), ("fake_quant_enabled", 1), ("initialized", 0), ("frozen", 0)):
            self.register_buffer(flag, torch.tensor([on], dtype=torch.uint8))
        self.grad_factor: float | None = None  # LSQ; None: lsq_grad_factor(N, q_max) with N from the input

    # -- switches -------------------------------------------------------------------------------
    def enable_observer(self, enabled: bool = True) -> "FakeQuantize":
        self.observer_enabled[0] = int(enabled)
        return self

    def disable_observer(self) -> "FakeQuantize":
        return self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> "FakeQuantize":
        self.fake_quant_enabled[0] = int(enabled)
        return self

    def disable_fake_quant(self) -> "FakeQuantize":
        return self.enable_fake_quant(False)

    def freeze(self, frozen: bool = True) -> "FakeQuantize":
        """Stop (or resume) changing the quantization parameters: the observer, and a learned scale's
        gradient (the scale is used detached, so optimizers leave it alone)."""
        self.enable_observer(not frozen)
        self.frozen[0] = int(frozen)
        return self

    @property
    def is_initialized(self) -> bool:
        return bool(self.initialized[0])

    # -- observing ------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold ``x``'s range into the state and refresh the scale / zero point (LSQ: only the first time)."""
        mn, mx = self._minmax(x.detach().float())
        if not (torch.isfinite(mn).all() and torch.isfinite(mx).all()):
            raise CalibrationError(f"NaN/Inf reached the fake-quant at {self.name!r}: check the inputs, the "
                                   f"learning rate and the loss (the range was left unchanged)")
        first = not self.is_initialized
        c = 1.0 if (first or self.weight) else self.spec.averaging_constant
        self.min_val.copy_(self.min_val + c * (mn - self.min_val))
        self.max_val.copy_(self.max_val + c * (mx - self.max_val))
        if first or not self.learn_scale:
            qp = compute_qparams(self.min_val, self.max_val, self.spec)
            self.scale.data.copy_(qp.scale)
            self.zero_point.copy_(qp.zero_point.to(torch.int32))
        self.initialized[0] = 1

    def _minmax(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.axis is None:
            return torch.aminmax(x)
        flat = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        return flat.amin(1), flat.amax(1)  # 5x faster than aminmax(dim=1) on this CPU (ResNet-18 weights)

    def _observing(self) -> bool:
        if not bool(self.observer_enabled[0]):
            return False
        if self.learn_scale and self.is_initialized:
            return False  # LSQ: the observer only initialises the scale
        return self.training or self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self._observing():
            self.observe(x)
        if not bool(self.fake_quant_enabled[0]):
            return x
        if not self.is_initialized:
            raise CalibrationError(
                f"the fake-quant at {self.name!r} has no range yet: run training-mode batches through the QAT "
                f"model (or qat.calibrate(samples)) before evaluating it")
        qmin, qmax = self.spec.quant_min, self.spec.quant_max
        zp = None if self.spec.symmetric and self.spec.signed else self.zero_point
        if not self.learn_scale:
            return ste_fake_quantize(x, self.scale, zp, qmin, qmax, self.axis)
        g = self.grad_factor if self.grad_factor is not None else lsq_grad_factor(self._numel_per_scale(x), qmax)
        scale = self.scale.detach() if bool(self.frozen[0]) else self.scale
        return lsq_fake_quantize(x, scale, zp, (qmin, qmax), self.axis, g)

    def _numel_per_scale(self, x: Tensor) -> int:
        """LSQ's N: weights per scale, or features per sample for activations (batch-size independent)."""
        if self.weight:
            return x.numel() // max(self.scale.numel(), 1)
        return x[0].numel() if x.dim() > 1 else x.numel()

    # -- results --------------------------------------------------------------------------------
    def calculate_qparams(self) -> QParams:
        """The parameters the forward uses now (what convert puts in the reference graph)."""
        if not self.is_initialized:
            raise CalibrationError(f"no data reached the fake-quant at {self.name!r}: train (or calibrate) the "
                                   f"QAT model before convert()")
        return QParams(scale=self.scale.detach().clamp_min(_EPS).float().clone(),
                       zero_point=self.zero_point.to(torch.int64).clone(), quant_min=self.spec.quant_min,
                       quant_max=self.spec.quant_max, dtype=self.spec.dtype, axis=self.axis)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, spec={self.spec.describe()!r}, learn_scale={self.learn_scale}, "
                f"weight={self.weight}, observer={bool(self.observer_enabled[0])}, "
                f"fake_quant={bool(self.fake_quant_enabled[0])}")


def make_fake_quant(spec: QuantSpec, name: str = "<unnamed>", *, learn_scale: bool = False,
                    weight: Tensor | None = None) -> FakeQuantize:
    """A FakeQuantize for ``spec``. With ``weight`` (the tensor it will see) the module is a weight
    fake-quant, sized for the weight's channels and initialised from it."""
    if weight is None:
        return FakeQuantize(spec, name, learn_scale=learn_scale)
    channels = weight.shape[spec.axis] if spec.granularity == "per_channel" else None
    fq = FakeQuantize(spec, name, learn_scale=learn_scale, channels=channels, weight=True)
    fq.observe(weight)
    return fq
