"""The toy runtime: int8 x int8 -> int32 accumulation in plain torch, then requantization to int8.

Each kernel takes the int8 codes of its input (with their scale / zero point), the int8 weight codes with
their scales, the float bias and the output's scale / zero point, and returns int8 codes, as an int8
accelerator would (float32 when the output is a float model output). The bias is quantized to int32 with
scale ``input_scale * weight_scale``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _requantize(acc: torch.Tensor, x_scale: float, w_scale: torch.Tensor, bias, out_scale, out_zp: int,
                qmin: int, qmax: int, channel_dim: int) -> torch.Tensor:
    """int32 accumulator -> int8 codes of the output (or float32 when ``out_scale`` is None: a float output)."""
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    eff = (x_scale * w_scale.double()).reshape(shape)  # the int32 accumulator's scale, per output channel
    if bias is not None:
        acc = acc + torch.round(bias.double().reshape(shape) / eff).to(torch.int32)
    if out_scale is None:
        return (acc.double() * eff).float()
    out = torch.round(acc.double() * (eff / out_scale)) + out_zp
    return out.clamp(qmin, qmax).to(torch.int8)


def _centered(codes: torch.Tensor, zero_point) -> torch.Tensor:
    return codes.to(torch.int32) - int(zero_point)


def conv2d_int8(x, x_scale, x_zp, w, w_scale, bias, out_scale, out_zp, qmin, qmax,
                stride=1, padding=0, dilation=1, groups=1):
    """int8 conv2d: int32 accumulation of (x - zero point) * w, then requantization."""
    # zero padding of the centered codes is the reference's zero padding of the float input
    acc = F.conv2d(_centered(x, x_zp), w.to(torch.int32), None, stride, padding, dilation, groups)
    return _requantize(acc, x_scale, torch.as_tensor(w_scale), bias, out_scale, out_zp, qmin, qmax, 1)


def linear_int8(x, x_scale, x_zp, w, w_scale, bias, out_scale, out_zp, qmin, qmax):
    """int8 linear: int32 matmul of (x - zero point) and w^T, then requantization."""
    acc = _centered(x, x_zp) @ w.to(torch.int32).t()
    return _requantize(acc, x_scale, torch.as_tensor(w_scale), bias, out_scale, out_zp, qmin, qmax, -1)
