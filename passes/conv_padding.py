"""``conv{1,2}d(..., padding="same" | "valid")`` -> the integer-padding overload every backend quantizes.

``nn.Conv2d(padding="same")`` captures as ``aten.conv2d.padding`` (a string argument), which no support
table lists: such convs stayed float. "valid" is padding 0. "same" pads ``dilation * (kernel - 1)`` per
spatial dim; when that total is even it is the symmetric integer padding (exact); when it is odd, PyTorch
puts the extra element at the end, which is written as an explicit ``constant_pad_nd`` before a conv with
padding 0 (exact too).
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile.ir import fill_fake_val

aten = torch.ops.aten
_STRING_PADDING = {aten.conv2d.padding: (aten.conv2d.default, 2), aten.conv1d.padding: (aten.conv1d.default, 1)}


_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = (None, None, None, 1, "valid", 1, 1)


def conv_arguments(node: fx.Node) -> dict:
    """Every argument of a conv node by name (``_NAMES``), defaults filled in."""
    a = dict(zip(_NAMES, _DEFAULTS))
    a.update(zip(_NAMES, node.args))
    a.update(node.kwargs)
    return a


def _per_dim(v, dims: int) -> list:
    v = [v] if isinstance(v, int) else list(v)
    return v * dims if len(v) == 1 else v


def _same_padding(weight_val, dilation, dims: int) -> tuple[list, list]:
    """(symmetric padding per dim, extra end padding per dim) of padding="same"."""
    sym, extra = [], []
    for i in range(dims):
        total = dilation[i] * (weight_val.shape[2 + i] - 1)
        sym.append(total // 2)
        extra.append(total % 2)
    return sym, extra


def rewrite_string_padding(gm: fx.GraphModule) -> bool:
    """Rewrite every ``conv*.padding`` node in place; True if the graph changed."""
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _STRING_PADDING:
            continue
        target, dims = _STRING_PADDING[node.target]
        a = conv_arguments(node)
        x, w, b, padding, groups = a["input"], a["weight"], a["bias"], a["padding"], a["groups"]
        stride, dilation = _per_dim(a["stride"], dims), _per_dim(a["dilation"], dims)
        w_val = w.meta.get("val") if isinstance(w, fx.Node) else None
        if padding == "valid":
            pads = [0] * dims
        elif padding == "same" and w_val is not None:
            pads, extra = _same_padding(w_val, dilation, dims)
            if any(extra):
                pad_arg = []
                for i in reversed(range(dims)):  # constant_pad_nd lists the last dim first
                    pad_arg += [pads[i], pads[i] + extra[i]]
                with gm.graph.inserting_before(node):
                    x = gm.graph.call_function(aten.constant_pad_nd.default, (x, pad_arg, 0.0))
                x.meta.update({k: v for k, v in node.meta.items() if k != "val"})
                fill_fake_val(x)
                pads = [0] * dims
        else:
            continue
        node.target, node.args, node.kwargs = target, (x, w, b, stride, pads, dilation, groups), {}
        modified = True
    return modified
