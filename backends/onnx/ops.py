"""ATen -> ONNX: quantize / dequantize, weights, int32 biases and the compute ops (Conv, Gemm, MatMul).

``OPS`` maps each ATen overload to an :class:`OpEntry` (emit function, ONNX op, lowest opset). The
shape / element-wise ops live in ``ops_basic.py`` and are merged into ``OPS`` there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import fx

from qcompile.errors import UnsupportedError, where
from qcompile.ir import module_path

from .emit import DQ_OPS, Emitter

aten, qd = torch.ops.aten, torch.ops.quantized_decomposed


@dataclass(frozen=True)
class OpEntry:
    """emit(emitter, node) -> ONNX value; ``min_opset`` is required, ``best_opset`` is what the default
    opset rises to for a better form (e.g. Gelu-20, which ORT runs fused; below it Gelu is decomposed)."""

    emit: Callable[[Emitter, fx.Node], object]
    onnx_op: str
    min_opset: int = 13
    best_opset: int = 13


def arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def val(node):
    """The example value (``meta["val"]``) of an fx node when it is a tensor."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def axes(dims, r: int) -> list:
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted(d % r for d in dims)


def rank(node) -> int:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else -1


# ----------------------------------------------------------------------------- quantize / dequantize
def _qparam_inits(em: Emitter, base: str, scale: float, zp: int, dtype: torch.dtype) -> tuple[str, str]:
    s = em.init(np.asarray(scale, dtype=np.float32), f"{base}:scale")
    z = em.init(np.asarray(zp), f"{base}:zero_point", dtype=dtype)
    return s, z


def _value_base(em: Emitter, value: fx.Node) -> str:
    return em.base_name(value)


def quantize(em: Emitter, node: fx.Node):
    x, scale, zp, qmin, qmax, dtype = node.args[:6]
    full = torch.iinfo(dtype)
    if (qmin, qmax) != (full.min, full.max):
        em.out.notes.append(f"{node.name}: range [{qmin}, {qmax}] is narrower than {dtype}; ONNX QuantizeLinear "
                            f"saturates at [{full.min}, {full.max}] (identical inside the calibrated range)")
    base = _value_base(em, x)
    s, z = _qparam_inits(em, base, float(scale), int(zp), dtype)
    out = em.add("QuantizeLinear", [em.value(x), s, z], node, name=f"{base}:q")
    from .emit import QInfo
    em.out.quantized.append(QInfo(node.name, out, x.name, module_path(x), float(scale), int(zp), dtype))
    return out


def dequantize(em: Emitter, node: fx.Node):
    src = node.args[0]
    if isinstance(src, fx.Node) and src.name in em.consts:  # a weight: emitted where it is used
        em.lazy[node.name] = lambda e, n: weight(e, n, None)
        return None
    scale, zp, _, _, dtype = node.args[1:6]
    base = _value_base(em, src.args[0]) if src.target in Q_TARGETS else _value_base(em, src)
    s, z = _qparam_inits(em, base, float(scale), int(zp), dtype)
    em.cache[("dq", node.name)] = (s, z)
    return em.add("DequantizeLinear", [em.value(src), s, z], node, name=f"{base}:dq")


Q_TARGETS = {qd.quantize_per_tensor.default}


def dequantize_per_channel(em: Emitter, node: fx.Node):
    em.lazy[node.name] = lambda e, n: weight(e, n, None)
    return None


def weight_info(em: Emitter, dq: fx.Node):
    """(int tensor, scale tensor, zero-point tensor, axis or None) behind a weight dequantize node."""
    q = em.consts[dq.args[0].name]
    if dq.target == qd.dequantize_per_tensor.default:
        return q, torch.tensor(float(dq.args[1])), torch.tensor(int(dq.args[2])), None
    s, z = em.consts[dq.args[1].name], em.consts[dq.args[2].name]
    return q, s.float(), z, int(dq.args[3]) % q.dim()


def weight(em: Emitter, dq: fx.Node, owner: fx.Node | None, transpose: bool = False, role: str = "weight") -> str:
    """Integer initializer -> DequantizeLinear for weight / bias ``dq`` (cached per layout)."""
    key = ("weight", dq.name, transpose)
    if key in em.cache:
        return em.cache[key]
    owner = owner or next(iter(dq.users))
    q, s, z, axis = weight_info(em, dq)
    if transpose:  # MatMul wants W^T [in, out]: the output channels move to axis 1
        q, axis = q.t().contiguous(), (1 if axis == 0 else 0 if axis == 1 else axis)
    path = module_path(owner) or owner.name
    base = f"{path}.{role}" + (".T" if transpose else "")
    shape = (-1,) if axis is not None else ()
    qi = em.init(q, base, share=False)
    si = em.init(s.reshape(shape), f"{base}:scale", dtype=torch.float32, share=False)
    zi = em.init(z.reshape(shape), f"{base}:zero_point", dtype=q.dtype, share=False)
    if role == "bias":
        em.tag(qi, owner.name, "bias")
    else:
        em.tag(qi, owner.name, "codes", q.numel())
        em.tag(si, owner.name, "scales")
        em.tag(zi, owner.name, "zero_points")
    attrs = {"axis": axis} if axis is not None else {}
    out = em.add("DequantizeLinear", [qi, si, zi], owner, name=f"{base}:dq", **attrs)
    em.out.weights[out] = dq.name
    em.cache[key] = out
    return out


def bias(em: Emitter, node: fx.Node, b) -> str:
    """The bias input: an int32 initializer -> DequantizeLinear when the reference quantized it
    (see ``bias.QuantizeBias``), else the float constant."""
    if b is None:
        return ""
    if isinstance(b, fx.Node) and b.target in DQ_OPS:
        return weight(em, b, node, role="bias")
    return em.value(b, f"{module_path(node) or node.name}.bias")


# ----------------------------------------------------------------------------- compute ops
def _pairs(v, n):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * n if len(v) == 1 else v


def conv(em: Emitter, node: fx.Node):
    x, w = node.args[0], node.args[1]
    b = arg(node, 2, "bias")
    n = rank(w) - 2 if rank(w) > 0 else 2
    stride, padding = _pairs(arg(node, 3, "stride", 1), n), arg(node, 4, "padding", 0)
    dilation, groups = _pairs(arg(node, 5, "dilation", 1), n), int(arg(node, 6, "groups", 1))
    attrs = {"strides": stride, "dilations": dilation, "group": groups}
    if isinstance(padding, str):
        attrs["auto_pad"] = {"same": "SAME_UPPER", "valid": "VALID"}[padding]
    else:
        attrs["pads"] = _pairs(padding, n) * 2
    return em.add("Conv", [em.value(x), em.value(w), bias(em, node, b)], node, **attrs)


def conv_transpose(em: Emitter, node: fx.Node):
    x, w, b = node.args[0], node.args[1], arg(node, 2, "bias")
    n = rank(w) - 2 if rank(w) > 0 else 2
    stride, padding = _pairs(arg(node, 3, "stride", 1), n), _pairs(arg(node, 4, "padding", 0), n)
    out_pad, groups = _pairs(arg(node, 5, "output_padding", 0), n), int(arg(node, 6, "groups", 1))
    dilation = _pairs(arg(node, 7, "dilation", 1), n)
    inputs = [em.value(x), em.value(w), bias(em, node, b)]
    return em.add("ConvTranspose", inputs, node, strides=stride, pads=padding * 2, output_padding=out_pad,
                  group=groups, dilations=dilation)


def linear(em: Emitter, node: fx.Node):
    x, w, b = node.args[0], node.args[1], arg(node, 2, "bias")
    if rank(x) == 2:
        return em.add("Gemm", [em.value(x), em.value(w), bias(em, node, b)], node, transB=1)
    if isinstance(w, fx.Node) and w.target in DQ_OPS:
        wt = weight(em, w, node, transpose=True)
    elif em.const_of(w) is not None:  # a float weight: store it transposed
        path = module_path(node) or node.name
        wt = em.init(em.const_of(w).detach().t().contiguous(), f"{path}.weight.T", share=False)
    else:
        wt = em.add("Transpose", [em.value(w)], node, suffix="/weight_T", perm=[1, 0])
    y = em.add("MatMul", [em.value(x), wt], node, suffix="/MatMul" if b is not None else "")
    return em.add("Add", [y, bias(em, node, b)], node) if b is not None else y


def matmul(em: Emitter, node: fx.Node):
    a, b = node.args[0], node.args[1]
    return em.add("MatMul", [em.value(a), em.value(b)], node)


def addmm(em: Emitter, node: fx.Node):
    c, a, b = node.args[:3]
    beta, alpha = float(node.kwargs.get("beta", 1)), float(node.kwargs.get("alpha", 1))
    return em.add("Gemm", [em.value(a), em.value(b), em.value(c)], node, alpha=alpha, beta=beta)


def _unsupported(why: str):
    def emit(em, node):
        raise UnsupportedError(f"onnx backend: {where(node)}: {why}")
    return emit


OPS: dict = {
    qd.quantize_per_tensor.default: OpEntry(quantize, "QuantizeLinear"),
    qd.dequantize_per_tensor.default: OpEntry(dequantize, "DequantizeLinear"),
    qd.dequantize_per_channel.default: OpEntry(dequantize_per_channel, "DequantizeLinear"),
    qd.dequantize_per_channel_group.default: OpEntry(
        _unsupported("per-group weights need blocked DequantizeLinear (opset 21); use per_channel weights"),
        "DequantizeLinear"),
    aten.conv1d.default: OpEntry(conv, "Conv"),
    aten.conv2d.default: OpEntry(conv, "Conv"),
    aten.conv2d.padding: OpEntry(conv, "Conv"),
    aten.conv_transpose2d.input: OpEntry(conv_transpose, "ConvTranspose"),
    aten.linear.default: OpEntry(linear, "Gemm/MatMul"),
    aten.matmul.default: OpEntry(matmul, "MatMul"),
    aten.bmm.default: OpEntry(matmul, "MatMul"),
    aten.mm.default: OpEntry(matmul, "MatMul"),
    aten.addmm.default: OpEntry(addmm, "Gemm"),
    aten.scaled_dot_product_attention.default: OpEntry(
        _unsupported("fused attention has no QDQ form; load the model with attn_implementation='eager'"),
        "Attention"),
}
