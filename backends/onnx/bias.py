"""Lower pass: give every int8 conv / linear an int32 bias in the reference graph.

ONNX QDQ (and ORT's QLinearConv / QGemm, TensorRT, QNN) adds the bias inside the int32 accumulator:
``bias_q = round(b / (s_x * s_w[c]))`` with scale ``s_x * s_w[c]`` and zero point 0 (the support table's
``DerivedSpec`` for biases). The core's convert keeps float biases, so this pass realizes the derived
spec before lowering: float bias constant -> int32 constant -> ``dequantize_per_channel`` (axis 0).
The reference graph then computes exactly what the emitted model means; with float biases left in
the reference, the up-to-half-step bias rounding flips output rounding in a few percent of values
per layer, which compounds through deep networks (ResNet-18: 74% -> 99% of outputs within one step).
Idempotent: a bias that already is a dequantize node is left alone.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile import annotation as A
from qcompile.ir import add_constant, copy_meta, get_attr_value, is_param
from qcompile.passes.infra import Pass, PassResult

aten, qd = torch.ops.aten, torch.ops.quantized_decomposed
_ANCHORS = {aten.conv1d.default, aten.conv2d.default, aten.conv2d.padding, aten.conv_transpose2d.input,
            aten.linear.default}
_DQ_W = {qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default}
INT32 = torch.iinfo(torch.int32)


def _weight_scale(gm: fx.GraphModule, w: fx.Node) -> torch.Tensor:
    if w.target == qd.dequantize_per_tensor.default:
        return torch.tensor([float(w.args[1])], dtype=torch.float64)
    return get_attr_value(gm, w.args[1]).detach().double().reshape(-1)


def bias_scale(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """float32 per-output-channel scale s_x * s_w[c] of ``node``'s bias, or None if it has none."""
    x, w = node.args[0], node.args[1]
    if not (isinstance(x, fx.Node) and x.target == qd.dequantize_per_tensor.default):
        return None
    if not (isinstance(w, fx.Node) and w.target in _DQ_W and is_param(w.args[0])):
        return None
    n_out = node.meta["val"].shape[1 if node.target != aten.linear.default else -1]
    sw = _weight_scale(gm, w)
    if sw.numel() not in (1, n_out):
        return None  # grouped conv-transpose: weight channels are not output channels
    return (float(x.args[1]) * sw).expand(n_out).float()


class QuantizeBias(Pass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _ANCHORS or len(node.args) < 3:
                continue
            b, ann = node.args[2], A.get_annotation(node)
            if not is_param(b) or ann is None or ann.status not in (A.INT8, A.FLOAT_OUTPUT):
                continue
            scale = bias_scale(gm, node)
            if scale is None:
                continue
            q = torch.round(get_attr_value(gm, b).detach().double() / scale.double())
            q = q.clamp(INT32.min, INT32.max).to(torch.int32)
            qn = add_constant(gm, f"{node.name}_bias_int", q, node)
            sn = add_constant(gm, f"{node.name}_bias_scale", scale, node)
            zn = add_constant(gm, f"{node.name}_bias_zp", torch.zeros_like(q, dtype=torch.int64), node)
            with gm.graph.inserting_before(node):
                dq = gm.graph.call_function(qd.dequantize_per_channel.default,
                                            (qn, sn, zn, 0, INT32.min, INT32.max, torch.int32))
            copy_meta(b, dq, keys=("val",))
            node.update_arg(2, dq)
            modified = True
        if modified:
            _drop_unused(gm)
        return PassResult(gm, modified)


def _drop_unused(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            target = node.target
            gm.graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
                owner, _, attr = target.rpartition(".")
                delattr(gm.get_submodule(owner) if owner else gm, attr)
