"""ATen -> ONNX for element-wise, activation, pooling, normalization and shape ops.

Each handler is ``fn(emitter, node) -> ONNX value name``; ``OPS`` (merged with ``ops.OPS``) is the
complete table the emitter dispatches on. Python scalars become initializers with the dtype of the
tensor they combine with, so integer mask arithmetic stays integer.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import fx

from qcompile.errors import UnsupportedError, where

from .emit import TORCH_TO_ONNX, Emitter
from .ops import OPS as COMPUTE_OPS
from .ops import OpEntry, arg, rank

aten = torch.ops.aten
INT64_MAX = 2**63 - 1


def _val(node):
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


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
    pairs = lambda v: (list(v) * n if len(list(v)) == 1 else list(v)) if isinstance(v, (list, tuple)) else [v] * n
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


def _axes(dims, r):
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted(d % r for d in dims)


def reduce(op: str):
    def emit(em, node):
        x = node.args[0]
        r = rank(x)
        dims = arg(node, 1, "dim", None)
        keep = int(bool(arg(node, 2, "keepdim", False)))
        axes = _axes(dims, r) if dims not in (None, []) else list(range(r))
        if op == "ReduceMean" and keep and r == 4 and axes == [2, 3]:
            return em.add("GlobalAveragePool", [em.value(x)], node)
        if op == "ReduceSum" or em.opset >= 18:
            return em.add(op, [em.value(x), em.ints(axes, "axes")], node, keepdims=keep)
        return em.add(op, [em.value(x)], node, axes=axes, keepdims=keep)
    return emit


def reshape(em, node):
    return em.add("Reshape", [em.value(node.args[0]), em.shape_value(node, list(node.args[1]))], node)


def flatten(em, node):
    x, start, end = node.args[0], int(arg(node, 1, "start_dim", 0)), int(arg(node, 2, "end_dim", -1))
    r = rank(x)
    if start % r == 1 and end % r == r - 1:
        return em.add("Flatten", [em.value(x)], node, axis=1)
    return em.add("Reshape", [em.value(x), em.shape_value(node, list(_val(node).shape))], node)


def permute(em, node):
    return em.add("Transpose", [em.value(node.args[0])], node, perm=[d % rank(node) for d in node.args[1]])


def transpose(em, node):
    r = rank(node)
    perm = list(range(r))
    a, b = int(node.args[1]) % r, int(node.args[2]) % r
    perm[a], perm[b] = perm[b], perm[a]
    return em.add("Transpose", [em.value(node.args[0])], node, perm=perm)


def t(em, node):
    return em.add("Transpose", [em.value(node.args[0])], node, perm=[1, 0])


def unsqueeze(em, node):
    d = int(node.args[1]) % rank(node)
    return em.add("Unsqueeze", [em.value(node.args[0]), em.ints([d], "axes")], node)


def squeeze(em, node):
    x = node.args[0]
    dims = arg(node, 1, "dim", None)
    if dims is None:
        return em.add("Squeeze", [em.value(x)], node)
    axes = [a for a in _axes(dims, rank(x)) if _val(x).shape[a] == 1]
    return em.add("Squeeze", [em.value(x), em.ints(axes, "axes")], node) if axes else em.value(x)


def cat(em, node):
    tensors = [t for t in node.args[0] if not (_val(t) is not None and _val(t).numel() == 0)]
    axis = int(arg(node, 1, "dim", 0)) % rank(node)
    return em.add("Concat", [em.value(t) for t in tensors], node, axis=axis)


def slice_(em, node):
    x, dim = node.args[0], int(arg(node, 1, "dim", 0))
    start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    start = 0 if start is None else start
    end = INT64_MAX if end is None or (isinstance(end, int) and end >= INT64_MAX // 2) else end
    parts = [em.ints([int(v)]) if isinstance(v, int) else em._sym(v) for v in (start, end)]
    return em.add("Slice", [em.value(x), *parts, em.ints([dim % rank(x)]), em.ints([int(step)])], node)


def select(em, node):
    x, dim, index = node.args[0], int(node.args[1]), node.args[2]
    idx = em.init(np.asarray(int(index), dtype=np.int64), "index")
    return em.add("Gather", [em.value(x), idx], node, axis=dim % rank(x))


def expand(em, node):
    x, sizes = node.args[0], list(node.args[1])
    sizes = [1 if isinstance(s, int) and s == -1 else s for s in sizes]
    return em.add("Expand", [em.value(x), em.shape_value(node, sizes)], node)


def embedding(em, node):
    return em.add("Gather", [em.value(node.args[0]), em.value(node.args[1])], node, axis=0)


def gather(em, node):
    return em.add("GatherElements", [em.value(node.args[0]), em.value(node.args[2])], node,
                  axis=int(node.args[1]) % rank(node))


def index(em, node):
    """x[i0, i1, ...] with index tensors for the leading dims -> GatherND on the broadcast indices."""
    x, indices = node.args[0], node.args[1]
    if any(i is None for i in indices):
        raise UnsupportedError(f"onnx backend: {where(node)}: indexing with None/slices is not mapped")
    consts = [em.const_of(i) for i in indices]
    if any(c is None for c in consts):
        raise UnsupportedError(f"onnx backend: {where(node)}: indexing with runtime index tensors is not mapped")
    b = torch.broadcast_tensors(*[c.long() for c in consts])
    idx = em.init(torch.stack(b, dim=-1), "index")
    return em.add("GatherND", [em.value(x), idx], node)


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


def full_like(value=None):
    def emit(em, node):
        v = value if value is not None else node.args[1]
        out = _val(node)
        fill = torch.tensor([v], dtype=out.dtype)
        shape = em.add("Shape", [em.value(node.args[0])], node, suffix="/shape")
        return em.add("ConstantOfShape", [shape], node, value=_tensor_attr(fill))
    return emit


def new_full(value=None):
    def emit(em, node):
        v = value if value is not None else node.args[2]
        out = _val(node)
        fill = torch.tensor([v], dtype=out.dtype)
        return em.add("ConstantOfShape", [em.shape_value(node, list(node.args[1]))], node, value=_tensor_attr(fill))
    return emit


def _tensor_attr(t: torch.Tensor):
    from onnx import numpy_helper
    return numpy_helper.from_array(t.numpy(), "value")


def sym_size(em, node):
    d = int(node.args[1])
    return em.add("Shape", [em.value(node.args[0])], node, start=d, end=d + 1)


def getitem(em, node):
    src, i = node.args
    vals = em.env[src.name]
    if not isinstance(vals, (list, tuple)) or vals[i] is None:
        raise UnsupportedError(f"onnx backend: {where(node)}: output {i} of {src.name} is not available in ONNX")
    return vals[i]


def constant_pad(em, node):
    x, pad, value = node.args[0], list(node.args[1]), float(arg(node, 2, "value", 0.0))
    r = rank(x)
    begins, ends = [0] * r, [0] * r
    for k in range(len(pad) // 2):
        begins[r - 1 - k], ends[r - 1 - k] = pad[2 * k], pad[2 * k + 1]
    return em.add("Pad", [em.value(x), em.ints(begins + ends, "pads"), em.scalar_like(value, node)], node)


def split(em, node):
    x, sizes, dim = node.args[0], node.args[1], int(arg(node, 2, "dim", 0))
    r = rank(x)
    total = _val(x).shape[dim % r]
    if isinstance(sizes, int):
        sizes = [sizes] * (total // sizes) + ([total % sizes] if total % sizes else [])
    return em.add("Split", [em.value(x), em.ints(sizes, "split")], node, n_out=len(sizes), axis=dim % r)


def rsqrt(em, node):
    return em.add("Reciprocal", [em.add("Sqrt", [em.value(node.args[0])], node, suffix="/sqrt")], node)


def hardswish(em, node):
    return em.add("HardSwish", [em.value(node.args[0])], node)


def sym_binary(op: str):
    def emit(em, node):
        return em.add(op, [em._sym(a) if isinstance(a, fx.Node) else em.ints([int(a)]) for a in node.args], node)
    return emit


_E = OpEntry
OPS = dict(COMPUTE_OPS)
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
    aten.gelu.default: _E(gelu, "Gelu"),
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
    aten.le.Scalar: _E(compare("LessOrEqual"), "LessOrEqual"), aten.le.Tensor: _E(compare("LessOrEqual"), "LessOrEqual"),
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
    aten.view.default: _E(reshape, "Reshape"), aten.reshape.default: _E(reshape, "Reshape"),
    aten._unsafe_view.default: _E(reshape, "Reshape"),
    aten.flatten.using_ints: _E(flatten, "Flatten"),
    aten.permute.default: _E(permute, "Transpose"), aten.transpose.int: _E(transpose, "Transpose"),
    aten.t.default: _E(t, "Transpose"),
    aten.unsqueeze.default: _E(unsqueeze, "Unsqueeze"),
    aten.squeeze.dim: _E(squeeze, "Squeeze"), aten.squeeze.dims: _E(squeeze, "Squeeze"),
    aten.squeeze.default: _E(squeeze, "Squeeze"),
    aten.cat.default: _E(cat, "Concat"),
    aten.slice.Tensor: _E(slice_, "Slice"), aten.select.int: _E(select, "Gather"),
    aten.expand.default: _E(expand, "Expand"),
    aten.embedding.default: _E(embedding, "Gather"),
    aten.gather.default: _E(gather, "GatherElements"),
    aten.index.Tensor: _E(index, "GatherND"),
    aten.to.dtype: _E(cast, "Cast"), aten.to.dtype_layout: _E(cast, "Cast"), aten.to.device: _E(cast, "Cast"),
    aten._to_copy.default: _E(cast, "Cast"), aten.type_as.default: _E(cast, "Cast"),
    aten.clone.default: _E(identity, "Identity"), aten.contiguous.default: _E(identity, "Identity"),
    aten.alias.default: _E(identity, "Identity"), aten.detach.default: _E(identity, "Identity"),
    aten.dropout.default: _E(identity, "Identity"),
    aten.where.self: _E(where_, "Where"), aten.where.ScalarOther: _E(where_, "Where"),
    aten.where.ScalarSelf: _E(where_, "Where"), aten.where.Scalar: _E(where_, "Where"),
    aten.masked_fill.Scalar: _E(masked_fill, "Where"),
    aten.ones_like.default: _E(full_like(1), "ConstantOfShape"),
    aten.zeros_like.default: _E(full_like(0), "ConstantOfShape"),
    aten.full_like.default: _E(full_like(), "ConstantOfShape"),
    aten.new_ones.default: _E(new_full(1), "ConstantOfShape"),
    aten.new_zeros.default: _E(new_full(0), "ConstantOfShape"),
    aten.new_full.default: _E(new_full(), "ConstantOfShape"),
    aten.constant_pad_nd.default: _E(constant_pad, "Pad"),
    aten.split.Tensor: _E(split, "Split"), aten.split_with_sizes.default: _E(split, "Split"),
    aten.sym_size.int: _E(sym_size, "Shape"),
    operator.getitem: _E(getitem, "(output)"),
    operator.mul: _E(sym_binary("Mul"), "Mul"), operator.add: _E(sym_binary("Add"), "Add"),
    operator.sub: _E(sym_binary("Sub"), "Sub"), operator.floordiv: _E(sym_binary("Div"), "Div"),
})
