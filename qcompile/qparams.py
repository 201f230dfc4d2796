"""All quantization arithmetic: qparams from ranges, quantize / dequantize / fake-quantize, SQNR.

Conventions
-----------
* ``compute_qparams`` is element-wise: ``min_val`` / ``max_val`` may have any shape and the scale /
  zero point come back with that shape.
    - per_tensor: 0-d tensors.
    - per_channel: 1-d, one entry per channel along ``spec.axis``.
    - per_group:  ``[*x.shape[:-1], n_groups]`` (groups of ``group_size`` along the last axis, the
      last group may be ragged).  A flattened ``[rows * n_groups]`` scale is accepted by
      ``quantize`` too.
    - per_token:  keep-dim shape ``[*x.shape[:-1], 1]``; ``QParams.axis``/``group_size`` stay None
      and the scale simply broadcasts against the tensor.
* The range is always widened to contain 0, so 0.0 is exactly representable.
* Symmetric: ``scale = amax / ((quant_max - quant_min) / 2)`` (amax/127 for narrow int8
  [-127, 127], amax/127.5 for [-128, 127], as torch.ao); zero point 0 for signed dtypes and
  ``(quant_min + quant_max + 1) // 2`` (128 for uint8) for unsigned ones.
* Affine: ``scale = (max - min) / (quant_max - quant_min)``,
  ``zero_point = clamp(round(quant_min - min / scale), quant_min, quant_max)``.
* A degenerate (all-zero) range gets ``scale = 1.0`` (any value works, 1.0 keeps derived bias
  scales sane); other scales are clamped to at least ``torch.finfo(torch.float32).eps``.
* Rounding is half-to-even (``torch.round``) everywhere.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import CalibrationError
from .specs import QParams, QuantSpec

__all__ = [
    "compute_qparams", "quantize", "dequantize", "fake_quantize", "sqnr",
    "qparams_from_tensor", "reduce_minmax", "representable_range",
]

_EPS = torch.finfo(torch.float32).eps


def _quant_bounds(spec_or_qp) -> tuple[int, int]:
    qmin, qmax = int(spec_or_qp.quant_min), int(spec_or_qp.quant_max)
    if qmax <= qmin:
        raise ValueError(f"empty quantization range [{qmin}, {qmax}] (too few effective bits)")
    return qmin, qmax


def _scale_zero_point(min_val: Tensor, max_val: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Element-wise scale (float32) and zero point (int64) for ranges already containing 0."""
    qmin, qmax = _quant_bounds(spec)
    if spec.symmetric:
        amax = torch.maximum(-min_val, max_val)
        scale = amax / ((qmax - qmin) / 2.0)
        degenerate = amax == 0
    else:
        scale = (max_val - min_val) / float(qmax - qmin)
        degenerate = max_val == min_val
    scale = torch.where(degenerate, torch.ones_like(scale), scale).clamp_min(_EPS)
    if spec.symmetric:
        zp_value = 0 if spec.signed else (qmin + qmax + 1) // 2
        zero_point = torch.full(scale.shape, zp_value, dtype=torch.int64)
    else:
        zero_point = torch.round(qmin - min_val / scale).clamp(qmin, qmax).to(torch.int64)
    return scale, zero_point


def compute_qparams(min_val: Tensor, max_val: Tensor, spec: QuantSpec) -> QParams:
    """Quantization parameters covering ``[min_val, max_val]`` (element-wise, see module docs)."""
    min_val = torch.as_tensor(min_val).detach().to(torch.float32)
    max_val = torch.as_tensor(max_val).detach().to(torch.float32)
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val shape {tuple(min_val.shape)} != max_val shape {tuple(max_val.shape)}")
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise CalibrationError("compute_qparams got a NaN/Inf range: the observed data was not finite")
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    scale, zero_point = _scale_zero_point(min_neg, max_pos, spec)
    axis = spec.axis if spec.granularity == "per_channel" else None
    group_size = spec.group_size if spec.granularity == "per_group" else None
    return QParams(scale=scale, zero_point=zero_point, quant_min=spec.quant_min,
                   quant_max=spec.quant_max, dtype=spec.dtype, axis=axis, group_size=group_size)


def representable_range(qp: QParams) -> tuple[Tensor, Tensor]:
    """Smallest and largest real values the grid holds: ``(q - zp) * scale`` at qmin / qmax."""
    s = qp.scale.to(torch.float64)
    zp = qp.zero_point.to(torch.float64)
    return (qp.quant_min - zp) * s, (qp.quant_max - zp) * s


def _expand(param: Tensor, x: Tensor, qp: QParams) -> Tensor:
    """Reshape a scale / zero-point tensor so it broadcasts against ``x``."""
    if qp.group_size is not None:
        g = int(qp.group_size)
        d = x.shape[-1] if x.dim() else 1
        n_groups = -(-d // g)
        lead = tuple(x.shape[:-1])
        if param.numel() != math.prod(lead) * n_groups:
            raise ValueError(f"per_group params of {param.numel()} entries do not fit a tensor of shape "
                             f"{tuple(x.shape)} with group_size={g} ({math.prod(lead) * n_groups} expected)")
        p = param.reshape(*lead, n_groups).repeat_interleave(g, dim=-1)
        return p[..., :d]
    if qp.axis is not None:
        axis = qp.axis % x.dim()
        if param.numel() != x.shape[axis]:
            raise ValueError(f"per_channel params of {param.numel()} entries do not match "
                             f"{x.shape[axis]} channels along axis {qp.axis} of shape {tuple(x.shape)}")
        shape = [1] * x.dim()
        shape[axis] = -1
        return param.reshape(shape)
    return param  # per-tensor (0-d / 1 element) or per-token keep-dim shape: plain broadcasting


def _compute_dtype(x: Tensor, qp: QParams) -> torch.dtype:
    wide = (qp.quant_max - qp.quant_min) > 2**24 or x.dtype == torch.float64
    return torch.float64 if wide else torch.float32


def _quantize_float(x: Tensor, qp: QParams) -> tuple[Tensor, Tensor, Tensor]:
    """``clamp(round(x / s) + zp)`` in floating point; returns (q, s, zp) broadcast-ready."""
    ct = _compute_dtype(x, qp)
    xf = x.to(ct)
    s = _expand(qp.scale.to(ct), xf, qp)
    zp = _expand(qp.zero_point.to(ct), xf, qp)
    q = torch.clamp(torch.round(xf / s) + zp, qp.quant_min, qp.quant_max)
    return q, s, zp


def quantize(x: Tensor, qp: QParams) -> Tensor:
    """Real tensor -> integer tensor of ``qp.dtype`` (round half to even, then clamp)."""
    q, _, _ = _quantize_float(x, qp)
    return q.to(qp.dtype)


def dequantize(q: Tensor, qp: QParams) -> Tensor:
    """Integer tensor -> float32 real values ``(q - zp) * scale``."""
    ct = _compute_dtype(q, qp)
    qf = q.to(ct)
    s = _expand(qp.scale.to(ct), qf, qp)
    zp = _expand(qp.zero_point.to(ct), qf, qp)
    return ((qf - zp) * s).to(torch.float32)


def fake_quantize(x: Tensor, qp: QParams) -> Tensor:
    """``dequantize(quantize(x))`` computed in floating point; keeps ``x``'s float dtype."""
    q, s, zp = _quantize_float(x, qp)
    out = (q - zp) * s
    return out.to(x.dtype if x.is_floating_point() else torch.float32)


def sqnr(reference: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical, -inf for a zero reference)."""
    ref = reference.detach().to(torch.float64)
    noise = float(((ref - test.detach().to(torch.float64)) ** 2).sum())
    signal = float((ref**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _group_view(x: Tensor, group_size: int) -> Tensor:
    """``x`` as ``[*x.shape[:-1], n_groups, group_size]``, zero-padding a ragged last group.

    Padding with zeros never changes the result because ranges always include 0.
    """
    if x.dim() == 0:
        x = x.reshape(1)
    d = x.shape[-1]
    n_groups = -(-d // group_size)
    pad = n_groups * group_size - d
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], n_groups, group_size)


def reduce_minmax(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Min / max of ``x`` reduced according to ``spec.granularity`` (shapes as in the module docs)."""
    x = x.detach()
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.to(torch.float32)
    if x.numel() == 0:
        raise CalibrationError(f"cannot compute a range of an empty tensor of shape {tuple(x.shape)}")
    if spec.granularity == "per_tensor":
        return torch.aminmax(x)
    if spec.granularity == "per_channel":
        flat = x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)
        return torch.aminmax(flat, dim=1)
    if spec.granularity == "per_group":
        return torch.aminmax(_group_view(x, int(spec.group_size)), dim=-1)
    return torch.aminmax(x, dim=-1, keepdim=True)  # per_token


def qparams_from_tensor(x: Tensor, spec: QuantSpec) -> QParams:
    """Min/max-reduce ``x`` according to the spec's granularity, then ``compute_qparams``."""
    mn, mx = reduce_minmax(x, spec)
    return compute_qparams(mn, mx, spec)
