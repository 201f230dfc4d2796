"""ATen -> ONNX for element-wise, activation, pooling, normalization and cast ops.

Each handler is ``fn(emitter, node) -> ONNX value name``. ``OPS`` here merges ``ops.OPS`` (QDQ and
compute ops), ``ops_shape.SHAPE_OPS`` and ``ops_lowbit.OPS`` (dynamic / weight-only forms): it is the complete
table the emitter dispatches on.
Python scalars become initializers with the dtype of the tensor they combine with (integer mask
arithmetic stays integer); operands torch would promote are cast.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import fx

from qcompile.errors import UnsupportedError, where

from .emit import TORCH_TO_ONNX, Emitter
from .ops import OPS as COMPUTE_OPS
from .ops import OpEntry, arg, axes, rank
from .ops import val as _val
from .ops_lowbit import OPS as LOWBIT_OPS
from .ops_shape import SHAPE_OPS

aten = torch.ops.aten


def _operand(em: Emitter, x, like: fx.Node) -> str:
    """A tensor operand, or a scalar initializer typed like ``like``."""
    if isinstance(x, fx.Node):
        return em.value(x)
    return em.scalar_like(x, like)


def unary(op: str, **fixed):
    def emit(em, node):
        return em.add(op, [em.value(node.args[0])], node, **fixed)
    return emit


def _promoted(em: Emitter, x, node: fx.Node) -> str:
    """Operand ``x`` cast to ``node``'s output dtype when torch's type promotion changed it."""
    v, out = _operand(em, x, node), _val(node)
    if isinstance(x, fx.Node) and _val(x) is not None and out is not None and _val(x).dtype != out.dtype:
        return em.add("Cast", [v], node, suffix=f"/cast_{x.name}", to=TORCH_TO_ONNX[out.dtype])
    return v


def binary(op: str, reverse: bool = False):
    def emit(em, node):
        a, b = node.args[0], node.args[1]
        alpha = node.kwargs.get("alpha", arg(node, 2, "alpha", 1) if op in ("Add", "Sub") else 1)
        a, b = (b, a) if reverse else (a, b)
        bv = _promoted(em, b, node)
        if alpha != 1:
            bv = em.add("Mul", [bv, em.scalar_like(alpha, node)], node, suffix="/alpha")
        return em.add(op, [_promoted(em, a, node), bv], node)
    return emit


def compare(op: str, negate: bool = False):
    def emit(em, node):
        a, b = node.args[0], node.args[1]
        like = a if isinstance(a, fx.Node) else b
        y = em.add(op, [_operand(em, a, like), _operand(em, b, like)], node, suffix="/cmp" if negate else "")
        return em.add("Not", [y], node) if negate else y
    return emit


def div(em, node):
    if node.kwargs.get("rounding_mode") not in (None,):
        raise UnsupportedError(f"onnx backend: {where(node)}: div with rounding_mode is not mapped")
    return binary("Div")(em, node)


def clip(lo_default=None, hi_default=None):
    def emit(em, node):
        lo, hi = arg(node, 1, "min", lo_default), arg(node, 2, "max", hi_default)
        ins = [em.value(node.args[0])] + [_operand(em, v, node) if v is not None else "" for v in (lo, hi)]
        return em.add("Clip", ins, node)
    return emit


def gelu(em, node):
    approx = node.kwargs.get("approximate", arg(node, 1, "approximate", "none"))
    x = em.value(node.args[0])
    if em.opset >= 20:
        return em.add("Gelu", [x], node, approximate=approx)
    if approx == "tanh":
        c = em.scalar_like(math.sqrt(2 / math.pi), node)
        x3 = em.add("Pow", [x, em.scalar_like(3.0, node)], node, suffix="/x3")
        inner = em.add("Add", [x, em.add("Mul", [x3, em.scalar_like(0.044715, node)], node, suffix="/k")],
                       node, suffix="/inner")
        t = em.add("Tanh", [em.add("Mul", [inner, c], node, suffix="/scaled")], node, suffix="/tanh")
    else:
        t = em.add("Erf", [em.add("Div", [x, em.scalar_like(math.sqrt(2), node)], node, suffix="/div")],
                   node, suffix="/erf")
    one = em.add("Add", [t, em.scalar_like(1.0, node)], node, suffix="/add1")
    half = em.add("Mul", [x, em.scalar_like(0.5, node)], node, suffix="/half")
    return em.add("Mul", [half, one], node)


def silu(em, node):
    x = em.value(node.args[0])
    return em.add("Mul", [x, em.add("Sigmoid", [x], node, suffix="/sigmoid")], node)


def softmax(op: str):
    def emit(em, node):
        return em.add(op, [em.value(node.args[0])], node, axis=int(node.args[1]))
    return emit


def layer_norm(em, node):
    x, shape = node.args[0], node.args[1]
    w, b, eps = arg(node, 2, "weight"), arg(node, 3, "bias"), float(arg(node, 4, "eps", 1e-5))
    n = int(np.prod(shape))
    wv = em.value(w) if w is not None else em.init(np.ones(n, np.float32), "ones")
    ins = [em.value(x), wv] + ([em.value(b)] if b is not None else [])
    return em.add("LayerNormalization", ins, node, axis=-len(shape), epsilon=eps)


def batch_norm(em, node):
    x, w, b, mean, var = node.args[:5]
    eps = float(node.args[7] if node.target == aten.batch_norm.default else node.args[6])
    c = _val(mean).shape[0]
    wv = em.value(w) if w is not None else em.init(np.ones(c, np.float32), "ones")
    bv = em.value(b) if b is not None else em.init(np.zeros(c, np.float32), "zeros")
    y = em.add("BatchNormalization", [em.value(x), wv, bv, em.value(mean), em.value(var)], node, epsilon=eps)
    return y if node.target == aten.batch_norm.default else [y, None, None]


def _pool_attrs(node, kernel, stride, padding, dilation=None, ceil=False):
    n = len(kernel)

    def pairs(v):
        return (list(v) * n if len(list(v)) == 1 else list(v)) if isinstance(v, (list, tuple)) else [v] * n
    attrs = {"kernel_shape": list(kernel), "strides": pairs(stride) if stride else list(kernel),
             "pads": pairs(padding) * 2, "ceil_mode": int(bool(ceil))}
    if dilation is not None and any(d != 1 for d in pairs(dilation)):
        attrs["dilations"] = pairs(dilation)
    return attrs


def max_pool(em, node):
    k = arg(node, 1, "kernel_size")
    k = list(k) * 2 if len(k) == 1 else list(k)
    attrs = _pool_attrs(node, k, arg(node, 2, "stride", []), arg(node, 3, "padding", 0),
                        arg(node, 4, "dilation", 1), arg(node, 5, "ceil_mode", False))
    return em.add("MaxPool", [em.value(node.args[0])], node, **attrs)


def avg_pool(em, node):
    k = arg(node, 1, "kernel_size")
    k = list(k) * 2 if len(k) == 1 else list(k)
    if arg(node, 6, "divisor_override") is not None:
        raise UnsupportedError(f"onnx backend: {where(node)}: avg_pool2d divisor_override has no ONNX form")
    attrs = _pool_attrs(node, k, arg(node, 2, "stride", []), arg(node, 3, "padding", 0),
                        None, arg(node, 4, "ceil_mode", False))
    attrs["count_include_pad"] = int(bool(arg(node, 5, "count_include_pad", True)))
    return em.add("AveragePool", [em.value(node.args[0])], node, **attrs)


def adaptive_avg_pool(em, node):
    out = list(node.args[1])
    x = em.value(node.args[0])
    if all(o == 1 for o in out):
        return em.add("GlobalAveragePool", [x], node)
    size = list(_val(node.args[0]).shape[2:])
    if any(not isinstance(s, int) or s % o for s, o in zip(size, out)):
        raise UnsupportedError(f"onnx backend: {where(node)}: adaptive_avg_pool2d to {out} from {size} is not an "
                               f"even split (only those map to AveragePool)")
    k = [s // o for s, o in zip(size, out)]
    return em.add("AveragePool", [x], node, kernel_shape=k, strides=k)


def reduce(op: str):
    def emit(em, node):
        x = node.args[0]
        r = rank(x)
        dims = arg(node, 1, "dim", None)
        keep = int(bool(arg(node, 2, "keepdim", False)))
        dims = axes(dims, r) if dims not in (None, []) else list(range(r))
        if op == "ReduceMean" and keep and r == 4 and dims == [2, 3]:
            return em.add("GlobalAveragePool", [em.value(x)], node)
        if op == "ReduceSum" or em.opset >= 18:
            return em.add(op, [em.value(x), em.ints(dims, "axes")], node, keepdims=keep)
        return em.add(op, [em.value(x)], node, axes=dims, keepdims=keep)
    return emit


def cast(em, node):
    x = node.args[0]
    dtype = node.kwargs.get("dtype") or next((a for a in node.args[1:] if isinstance(a, torch.dtype)), None)
    src = _val(x)
    if dtype is None or (src is not None and src.dtype == dtype):
        return em.add("Identity", [em.value(x)], node)
    return em.add("Cast", [em.value(x)], node, to=TORCH_TO_ONNX[dtype])


def identity(em, node):
    return em.add("Identity", [em.value(node.args[0])], node)


def where_(em, node):
    c, a, b = node.args[:3]
    return em.add("Where", [em.value(c), _operand(em, a, node), _operand(em, b, node)], node)


def masked_fill(em, node):
    x, mask, value = node.args[:3]
    return em.add("Where", [em.value(mask), _operand(em, value, node), em.value(x)], node)


def rsqrt(em, node):
    return em.add("Reciprocal", [em.add("Sqrt", [em.value(node.args[0])], node, suffix="/sqrt")], node)


def hardswish(em, node):
    return em.add("HardSwish", [em.value(node.args[0])], node)


_E = OpEntry
OPS = {**COMPUTE_OPS, **SHAPE_OPS}
OPS.update({
    aten.relu.default: _E(unary("Relu"), "Relu"),
    aten.hardtanh.default: _E(clip(-1.0, 1.0), "Clip"),
    aten.clamp.default: _E(clip(), "Clip"),
    aten.hardswish.default: _E(hardswish, "HardSwish", 14),
    aten.hardsigmoid.default: _E(unary("HardSigmoid", alpha=1.0 / 6, beta=0.5), "HardSigmoid"),
    aten.sigmoid.default: _E(unary("Sigmoid"), "Sigmoid"),
    aten.tanh.default: _E(unary("Tanh"), "Tanh"),
    aten.exp.default: _E(unary("Exp"), "Exp"),
    aten.log.default: _E(unary("Log"), "Log"),
    aten.neg.default: _E(unary("Neg"), "Neg"),
    aten.abs.default: _E(unary("Abs"), "Abs"),
    aten.sqrt.default: _E(unary("Sqrt"), "Sqrt"),
    aten.erf.default: _E(unary("Erf"), "Erf"),
    aten.reciprocal.default: _E(unary("Reciprocal"), "Reciprocal"),
    aten.rsqrt.default: _E(rsqrt, "Reciprocal(Sqrt)"),
    aten.logical_not.default: _E(unary("Not"), "Not"),
    aten.leaky_relu.default: _E(lambda em, n: unary("LeakyRelu", alpha=float(arg(n, 1, "negative_slope", 0.01)))(
        em, n), "LeakyRelu"),
    aten.gelu.default: _E(gelu, "Gelu", 13, 20),
    aten.silu.default: _E(silu, "Sigmoid*x"),
    aten.add.Tensor: _E(binary("Add"), "Add"), aten.add.Scalar: _E(binary("Add"), "Add"),
    aten.sub.Tensor: _E(binary("Sub"), "Sub"), aten.sub.Scalar: _E(binary("Sub"), "Sub"),
    aten.rsub.Scalar: _E(binary("Sub", reverse=True), "Sub"), aten.rsub.Tensor: _E(binary("Sub", reverse=True), "Sub"),
    aten.mul.Tensor: _E(binary("Mul"), "Mul"), aten.mul.Scalar: _E(binary("Mul"), "Mul"),
    aten.div.Tensor: _E(div, "Div"), aten.div.Scalar: _E(div, "Div"),
    aten.pow.Tensor_Scalar: _E(binary("Pow"), "Pow"), aten.pow.Tensor_Tensor: _E(binary("Pow"), "Pow"),
    aten.ge.Scalar: _E(compare("GreaterOrEqual"), "GreaterOrEqual"),
    aten.ge.Tensor: _E(compare("GreaterOrEqual"), "GreaterOrEqual"),
    aten.gt.Scalar: _E(compare("Greater"), "Greater"), aten.gt.Tensor: _E(compare("Greater"), "Greater"),
    aten.le.Scalar: _E(compare("LessOrEqual"), "LessOrEqual"),
    aten.le.Tensor: _E(compare("LessOrEqual"), "LessOrEqual"),
    aten.lt.Scalar: _E(compare("Less"), "Less"), aten.lt.Tensor: _E(compare("Less"), "Less"),
    aten.eq.Scalar: _E(compare("Equal"), "Equal"), aten.eq.Tensor: _E(compare("Equal"), "Equal"),
    aten.ne.Scalar: _E(compare("Equal", True), "Not(Equal)"), aten.ne.Tensor: _E(compare("Equal", True), "Not(Equal)"),
    aten.__and__.Tensor: _E(compare("And"), "And"), aten.logical_and.default: _E(compare("And"), "And"),
    aten.bitwise_and.Tensor: _E(compare("And"), "And"),
    aten.__or__.Tensor: _E(compare("Or"), "Or"), aten.logical_or.default: _E(compare("Or"), "Or"),
    aten.softmax.int: _E(softmax("Softmax"), "Softmax"), aten._softmax.default: _E(softmax("Softmax"), "Softmax"),
    aten.log_softmax.int: _E(softmax("LogSoftmax"), "LogSoftmax"),
    aten._log_softmax.default: _E(softmax("LogSoftmax"), "LogSoftmax"),
    aten.layer_norm.default: _E(layer_norm, "LayerNormalization", 17),
    aten.batch_norm.default: _E(batch_norm, "BatchNormalization"),
    aten._native_batch_norm_legit_no_training.default: _E(batch_norm, "BatchNormalization"),
    aten.max_pool2d.default: _E(max_pool, "MaxPool"),
    aten.avg_pool2d.default: _E(avg_pool, "AveragePool"),
    aten.adaptive_avg_pool2d.default: _E(adaptive_avg_pool, "GlobalAveragePool"),
    aten.mean.dim: _E(reduce("ReduceMean"), "ReduceMean"), aten.mean.default: _E(reduce("ReduceMean"), "ReduceMean"),
    aten.sum.dim_IntList: _E(reduce("ReduceSum"), "ReduceSum"), aten.sum.default: _E(reduce("ReduceSum"), "ReduceSum"),
    aten.to.dtype: _E(cast, "Cast"), aten.to.dtype_layout: _E(cast, "Cast"), aten.to.device: _E(cast, "Cast"),
    aten._to_copy.default: _E(cast, "Cast"), aten.type_as.default: _E(cast, "Cast"),
    aten.clone.default: _E(identity, "Identity"), aten.contiguous.default: _E(identity, "Identity"),
    aten.alias.default: _E(identity, "Identity"), aten.detach.default: _E(identity, "Identity"),
    aten.dropout.default: _E(identity, "Identity"),
    aten.where.self: _E(where_, "Where"), aten.where.ScalarOther: _E(where_, "Where"),
    aten.where.ScalarSelf: _E(where_, "Where"), aten.where.Scalar: _E(where_, "Where"),
    aten.masked_fill.Scalar: _E(masked_fill, "Where"),
})
OPS.update(LOWBIT_OPS)  # dynamic / weight-only forms; static graphs fall through to ops.linear / ops_shape.embedding
