"""Zero padding in front of a convolution becomes the convolution's own padding; a pad of nothing is removed.

TensorFlow-style "same" padding (Hugging Face's MobileNet V1 / V2 and EfficientNet with ``tf_padding``, many
ports of TF models) pads explicitly: ``pad(x, [l, r, t, b]) -> conv2d(padding=0)``. No backend runs ``pad``
in int8, so every such conv had a float op in front of it: a dequantize / pad / quantize round trip on x86
and ONNX, and on ExecuTorch a depthwise conv whose only consumer was a float pad lost its int8 output. The
pointwise (1x1) convs of those models get a pad of zeros, which is no op at all.

Rewritten, exactly in float:

* ``constant_pad_nd(x, pad, 0)`` / ``pad(x, pad, "constant", 0 or None)`` with every amount 0 -> ``x``;
* the same with symmetric, non-negative amounts on spatial dims only, whose every user is a
  ``conv1d`` / ``conv2d`` reading it as its input -> each conv's ``padding`` grows by those amounts and reads
  ``x``. A conv pads with zeros, so the result is the same.

Asymmetric padding (a stride-2 "same" conv pads 0 before and 1 after) has no conv equivalent and stays.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile.ir import constant_pad_value

from .conv_padding import _NAMES, _per_dim, conv_arguments

aten = torch.ops.aten
_CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2}


def _zero_pad(node: fx.Node) -> list | None:
    """The pad amounts of a constant zero pad node (last dim first, as torch lists them), else None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if constant_pad_value(node) != 0.0 or not isinstance(pad, (list, tuple)) or \
            not all(isinstance(p, int) for p in pad) or len(pad) % 2:
        return None
    return list(pad)


def _conv_args(conv: fx.Node, dims: int) -> list:
    """The seven conv2d.default arguments, stride / padding / dilation as per-dim lists."""
    a = conv_arguments(conv)
    padding = [0] * dims if a["padding"] == "valid" else a["padding"]
    if isinstance(padding, str):
        return [a[n] for n in _NAMES]  # "same": conv_padding rewrites it first; left alone here
    return [a["input"], a["weight"], a["bias"], _per_dim(a["stride"], dims), _per_dim(padding, dims),
            _per_dim(a["dilation"], dims), a["groups"]]


def _foldable_into(user: fx.Node, pad_node: fx.Node, per_dim: list) -> bool:
    dims = _CONVS.get(user.target) if user.op == "call_function" else None
    if dims is None or len(per_dim) > dims or user.args[0] is not pad_node or \
            pad_node in user.args[1:] or pad_node in user.kwargs.values():
        return False
    padding = _conv_args(user, dims)[4]
    return isinstance(padding, list) and len(padding) == dims and all(isinstance(p, int) for p in padding)


def fold_pads(gm: fx.GraphModule) -> bool:
    """Apply the rewrites of the module docstring in place; True if the graph changed."""
    modified = False
    for node in list(gm.graph.nodes):
        pad = _zero_pad(node)
        if pad is None:
            continue
        src = node.args[0]
        if not any(pad):
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            modified = True
            continue
        per_dim = [pad[i] for i in range(0, len(pad), 2)]  # last spatial dim first
        if any(pad[i] != pad[i + 1] or pad[i] < 0 for i in range(0, len(pad), 2)):
            continue
        val = src.meta.get("val")
        users = list(node.users)
        if not users or not all(_foldable_into(u, node, per_dim) for u in users):
            continue
        if isinstance(val, torch.Tensor) and len(per_dim) > val.dim() - 2:
            continue  # pads the channel or batch dim
        for user in users:
            dims = _CONVS[user.target]
            args = _conv_args(user, dims)
            for j, amount in enumerate(per_dim):  # per_dim[0] is the last dim
                args[4][dims - 1 - j] += amount
            args[0] = src
            user.args, user.kwargs = tuple(args), {}
        gm.graph.erase_node(node)
        modified = True
    return modified
