"""The integer weight behind a dequantize node of the reference graph: ``w = (q - zero_point) * scale``.

Reference-graph vocabulary every backend reads (the x86 kernels pack it, the ONNX backend writes it as
MatMulNBits), so it lives in the core.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from .ir import get_attr_value

qd = torch.ops.quantized_decomposed


@dataclass
class IntWeight:
    """An integer weight behind a dequantize node: ``w = (q - zero_point) * scale``."""

    q: torch.Tensor
    scale: torch.Tensor       # [N] (per channel), [N, K/g] (per group) or 0-d
    zero_point: torch.Tensor  # same shape
    quant_min: int
    quant_max: int
    group_size: int | None = None

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(self.quant_max - self.quant_min + 1)))

    def per_row(self, n: int):
        """(scale, zero point) as ``[N]`` when the weight has one scale per output row, else None."""
        if self.group_size is not None:
            return None
        return self.scale.float().reshape(-1).expand(n), self.zero_point.float().reshape(-1).expand(n)

    def grouped(self, k: int, g: int):
        """(scale, zero point) as ``[N, K/g]`` for a group size ``g`` the parameters are uniform over."""
        n = self.q.shape[0]
        if self.group_size is None:
            s, z = self.per_row(n)
            return s[:, None].expand(n, k // g), z[:, None].expand(n, k // g)
        if g != self.group_size:
            return None
        return self.scale.float().reshape(n, -1), self.zero_point.float().reshape(n, -1)

    def dequantize(self) -> torch.Tensor:
        q = self.q.float()
        if self.group_size is None:
            n = q.shape[0]
            s, z = self.per_row(n)
            shape = (n,) + (1,) * (q.dim() - 1)
            return (q - z.reshape(shape)) * s.reshape(shape)
        s, z = self.scale.float().reshape(q.shape[0], -1), self.zero_point.float().reshape(q.shape[0], -1)
        g = self.group_size
        return (q - z.repeat_interleave(g, 1)) * s.repeat_interleave(g, 1)


def int_weight(gm: fx.GraphModule, dq: fx.Node) -> IntWeight | None:
    """The integer constant and parameters behind a weight dequantize node (None if it is not one)."""
    if not isinstance(dq, fx.Node) or not dq.args or not isinstance(dq.args[0], fx.Node) or dq.args[0].op != "get_attr":
        return None
    q, a = get_attr_value(gm, dq.args[0]), dq.args
    val = lambda x: get_attr_value(gm, x) if isinstance(x, fx.Node) else torch.tensor(x)  # noqa: E731
    if dq.target == qd.dequantize_per_tensor.default:
        return IntWeight(q, val(a[1]).float(), val(a[2]), a[3], a[4])
    if dq.target == qd.dequantize_per_channel.default and int(a[3]) == 0:
        return IntWeight(q, val(a[1]), val(a[2]), a[4], a[5])
    if dq.target == qd.dequantize_per_channel_group.default:
        z = val(a[2]) if a[2] is not None else torch.zeros(1)
        return IntWeight(q, val(a[1]), z, a[3], a[4], int(a[6]))
    return None
