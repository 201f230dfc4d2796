"""Op kinds: the names the support tables, fusion patterns and the report use for sets of ATen overloads.

An *op kind* names a set of ATen overloads (``"conv2d"``, ``"relu"``...); ``relu6`` is hardtanh(0, 6).
It is a core vocabulary: backends' tables, the passes' patterns and the report all speak it.
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

OPS: dict[str, tuple] = {
    "conv1d": (aten.conv1d.default,),
    "conv2d": (aten.conv2d.default,),
    "conv_transpose2d": (aten.conv_transpose2d.input,),
    "linear": (aten.linear.default,),
    "matmul": (aten.matmul.default, aten.bmm.default),
    "relu": (aten.relu.default, aten.relu_.default),
    "hardtanh": (aten.hardtanh.default, aten.hardtanh_.default),
    "add": (aten.add.Tensor, aten.add_.Tensor),
    "mul": (aten.mul.Tensor, aten.mul_.Tensor),
    "cat": (aten.cat.default,),
    "max_pool2d": (aten.max_pool2d.default,),
    "avg_pool2d": (aten.avg_pool2d.default,),
    "adaptive_avg_pool2d": (aten.adaptive_avg_pool2d.default,),
    "mean": (aten.mean.dim,),
    "flatten": (aten.flatten.using_ints,),
    "reshape": (aten.view.default, aten.reshape.default, aten._unsafe_view.default),
    "permute": (aten.permute.default, aten.transpose.int),
    "unflatten": (aten.unflatten.int,),
    "unsqueeze": (aten.unsqueeze.default,),
    "squeeze": (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default),
    "select": (aten.select.int,),
    "hardswish": (aten.hardswish.default, aten.hardswish_.default),
    "hardsigmoid": (aten.hardsigmoid.default, aten.hardsigmoid_.default),
    "sigmoid": (aten.sigmoid.default,),
    "softmax": (aten.softmax.int, aten._softmax.default),
    "layer_norm": (aten.layer_norm.default,),
    "gelu": (aten.gelu.default,),
    "batch_norm": (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default),
    "dropout": (aten.dropout.default,),
    "embedding": (aten.embedding.default,),
    "scaled_dot_product_attention": (aten.scaled_dot_product_attention.default,),
}
_KIND = {op: kind for kind, ops in OPS.items() for op in ops}


_OWN_NAMESPACES = ("aten", "prims", "quantized_decomposed", "quantized", "qcompile")


def op_kind(node: fx.Node) -> str | None:
    """The op kind of a node; ``relu6`` for hardtanh(0, 6); a user's custom op (``torch.library``) is its
    own kind, named ``"namespace::name"`` (so support rows and lowering rules can name it)."""
    if node.op != "call_function":
        return None
    kind = _KIND.get(node.target)
    if kind is None and isinstance(node.target, torch._ops.OpOverload) and node.target.namespace not in _OWN_NAMESPACES:
        return node.target._schema.name
    if kind == "hardtanh" and tuple(node.args[1:3]) == (0.0, 6.0):
        return "relu6"
    return kind
