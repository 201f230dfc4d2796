"""ATen -> ONNX for the dynamic and weight-only reference graphs (``OnnxBackend`` modes).

dynamic (``choose_qparams.tensor -> quantize_per_tensor.tensor -> dequantize_per_tensor.tensor -> linear``)::

    x -> DynamicQuantizeLinear -> (x_q uint8, x_scale, x_zero_point)      one per quantized value (Q/K/V share it)
    MatMulInteger(x_q, W_q^T int8 [K, N], x_zero_point[, w_zero_point]) -> Cast(float)
      -> Mul(x_scale * w_scale[N]) -> Add(bias)

  the standard-ONNX form ORT's own ``quantize_dynamic`` writes; ORT fuses it into ``DynamicQuantizeMatMul``
  (or ``MatMulIntegerToFloat`` when several linears read one quantized value), bias included.

weight-only (float activations, ``dequantize_per_channel[_group]`` / ``dequantize_nf4`` weights)::

    int2..int8 -> com.microsoft MatMulNBits(x, B packed [N, K/block, block*bits/8], scales [N, K/block],
                  zero_points packed | default 2^(bits-1), bias); 3-bit values in 4-bit blocks, 5..7-bit in 8-bit
    NF4        -> com.microsoft MatMulBnb4(x, B [N*K/2] (first code in the high nibble), absmax [N*K/g]) + Add
    embedding int8 rows (axis 0) -> Gather(int8 table) -> Cast -> Mul(Gather(row scales))

Every other node keeps the static mode's handlers (``ops.py``); ``OPS`` overrides ``aten.linear`` /
``aten.embedding`` and falls back to them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import fx

from qcompile.errors import UnsupportedError, where
from qcompile.ir import module_path
from qcompile.lowbit import unpack_int4

from . import ops, ops_shape
from .emit import DQ_OPS, LOWBIT_DQ_OPS, TORCH_TO_ONNX, Emitter, _evaluate
from .modes import block_size
from .ops import OpEntry, arg, weight_info

aten, qd, qc = torch.ops.aten, torch.ops.quantized_decomposed, torch.ops.qcompile
MS = "com.microsoft"
DYNAMIC_DQ = qd.dequantize_per_tensor.tensor


# ----------------------------------------------------------------------------- dynamic activations
def choose_qparams(em: Emitter, node: fx.Node):
    """``choose_qparams.tensor(x, 0, 255, eps, uint8)`` -> DynamicQuantizeLinear(x); its (scale, zero point)
    are what the getitems read, the uint8 tensor is what ``quantize_per_tensor.tensor`` returns."""
    x, qmin, qmax, _, dtype = node.args[:5]
    if (qmin, qmax, dtype) != (0, 255, torch.uint8):
        raise UnsupportedError(f"onnx backend: {where(node)}: DynamicQuantizeLinear quantizes to uint8 [0, 255], "
                               f"not {dtype} [{qmin}, {qmax}]")
    base = em.base_name(x) if isinstance(x, fx.Node) else node.name
    q, s, z = em.add("DynamicQuantizeLinear", [em.value(x)], node, n_out=3, name=f"{base}:dynamic_q")
    em.cache[("dynamic_q", node.name)] = q
    return [s, z]


def quantize_dynamic(em: Emitter, node: fx.Node):
    x, s, _, qmin, qmax, dtype = node.args[:6]
    choose = s.args[0] if isinstance(s, fx.Node) and s.op == "call_function" and s.args else None
    key = ("dynamic_q", getattr(choose, "name", None))
    if key not in em.cache or choose.args[0] is not x or (qmin, qmax, dtype) != (0, 255, torch.uint8):
        raise UnsupportedError(f"onnx backend: {where(node)}: a run-time quantize must use the parameters "
                               f"DynamicQuantizeLinear chose for the same tensor (uint8 [0, 255])")
    return em.cache[key]


def dequantize_dynamic(em: Emitter, node: fx.Node):
    """Lazy: a dynamic linear reads the uint8 tensor itself; anything else gets a DequantizeLinear."""
    def emit(e: Emitter, n: fx.Node):
        q, s, z = n.args[:3]
        out = e.add("DequantizeLinear", [e.value(q), e.value(s), e.value(z)], n, suffix=":dq")
        e.env[n.name] = out
        return out
    em.lazy[node.name] = emit
    return None


def _dynamic_linear(em: Emitter, node: fx.Node, xdq: fx.Node, w: fx.Node, b) -> str:
    q, s, z, axis = weight_info(em, w)
    if q.dim() != 2 or q.dtype != torch.int8:
        raise UnsupportedError(f"onnx backend: {where(node)}: MatMulInteger needs a 2-D int8 weight")
    n, k = q.shape
    path = module_path(node) or node.name
    wq = em.tag(em.init(q.t().contiguous(), f"{path}.weight.T", share=False), node.name, "codes", n * k)
    ws = em.tag(em.init(s.reshape(-1) if axis is not None else s.reshape(()), f"{path}.weight.T:scale",
                        dtype=torch.float32, share=False), node.name, "scales")
    inputs = [em.value(xdq.args[0]), wq, em.value(xdq.args[2])]
    if bool((z != 0).any()):
        inputs.append(em.tag(em.init(z.reshape(-1) if axis is not None else z.reshape(()),
                                     f"{path}.weight.T:zero_point", dtype=torch.int8, share=False),
                             node.name, "zero_points"))
    acc = em.add("MatMulInteger", inputs, node, suffix="/MatMulInteger")
    accf = em.add("Cast", [acc], node, suffix="/Cast", to=onnx_float())
    scale = em.add("Mul", [em.value(xdq.args[1]), ws], node, suffix="/scale")
    y = em.add("Mul", [accf, scale], node, suffix="/Mul" if b is not None else "")
    gran = "per channel" if axis is not None else "per tensor"
    em.out.kernel_notes[node.name] = (
        "MatMulInteger", f"uint8 activations quantized at run time x int8 weights {gran}, int32 accumulation")
    if b is None:
        return y
    return em.add("Add", [y, _float_bias(em, node, b)], node)


def onnx_float() -> int:
    return TORCH_TO_ONNX[torch.float32]


def _float_bias(em: Emitter, node: fx.Node, b) -> str:
    name = ops.bias(em, node, b)
    return em.tag(name, node.name, "bias") if name in em.inits else name


# ----------------------------------------------------------------------------- weight-only
def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``codes`` [..., L] (< 2**bits) -> uint8 [..., ceil(L * bits / 8)]: element i of each byte
    in bits ``[i * bits, (i + 1) * bits)`` (the first code in the low bits), zero-padded."""
    per = 8 // bits
    pad = (-codes.shape[-1]) % per
    c = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), codes.dtype)], -1).astype(np.uint8)
    c = c.reshape(codes.shape[:-1] + (-1, per))
    out = np.zeros(c.shape[:-1], np.uint8)
    for i in range(per):
        out |= (c[..., i] << (bits * i)).astype(np.uint8)
    return out


def container_bits(bits: int) -> int:
    """The MatMulNBits width holding ``bits``-bit values (it runs 2, 4 and 8)."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def nbits_accuracy_level(em: Emitter, cbits: int) -> int:
    """fp32 activations (0) for 2/4-bit blocks: exact vs the reference and faster than fp32 MatMul; int8
    (4) for 8-bit blocks: ORT 1.32 has no fast fp32 path for them (10x slower than fp32 MatMul, measured)."""
    level = em.opts.accuracy_level
    return level if level is not None else (0 if cbits <= 4 else 4)


def _nbits_linear(em: Emitter, node: fx.Node, x, w: fx.Node, b) -> str | None:
    from qcompile.backends.x86.weight_only import int_weight
    iw = int_weight(em.ref, w)
    if iw is None or iw.q.dim() != 2:
        return None
    n, k = iw.q.shape
    g = iw.group_size
    block = block_size(k, g)
    nb = -(-k // block)
    if g:
        s, z = iw.grouped(k, g)                              # [N, K/g]
        s, z = s.repeat_interleave(g // block, 1), z.repeat_interleave(g // block, 1)
    else:
        s, z = iw.per_row(n)
        s, z = s[:, None].expand(n, nb), z[:, None].expand(n, nb)
    bits = iw.bits
    cbits = container_bits(bits)
    shift = 2 ** (cbits - 1) if iw.quant_min < 0 else 0      # signed codes -> unsigned blocks
    codes = (iw.q.int() + shift).numpy()
    zp = z.round().int().numpy() + shift
    if codes.min() < 0 or codes.max() >= 2**cbits or zp.min() < 0 or zp.max() >= 2**cbits:
        return None
    codes = np.concatenate([codes, np.zeros((n, nb * block - k), codes.dtype)], 1).reshape(n, nb, block)
    path = module_path(node) or node.name
    bi = em.tag(em.init(pack_bits(codes, cbits), f"{path}.weight:nbits", share=False), node.name, "codes", n * k)
    si = em.tag(em.init(s.float().contiguous(), f"{path}.weight:scales", share=False), node.name, "scales")
    zi = ""
    if (zp != 2 ** (cbits - 1)).any():  # MatMulNBits' default zero point is 2^(bits-1)
        zi = em.tag(em.init(pack_bits(zp, cbits), f"{path}.weight:zero_points", share=False), node.name,
                    "zero_points")
    level = nbits_accuracy_level(em, cbits)
    inputs = [em.value(x), bi, si, zi, "", _float_bias(em, node, b) if b is not None else ""]
    while inputs[-1] == "":
        inputs.pop()
    out = em.add("MatMulNBits", inputs, node, domain=MS, K=k, N=n, bits=cbits, block_size=block,
                 accuracy_level=level)
    kind = "symmetric" if not zi else "asymmetric"
    held = f"int{bits}" + (f" in {cbits}-bit blocks" if cbits != bits else "")
    grouping = f"group {g}" if g else ("per channel" if iw.scale.numel() > 1 else "per tensor")
    how = ("fp32 activations, weights unpacked block by block" if level in (0, 1) else
           f"accuracy_level={level}: activations quantized to int8 per block inside the kernel" if level == 4 else
           f"accuracy_level={level}")
    em.out.kernel_notes[node.name] = ("MatMulNBits", f"{held} {kind} {grouping}, block {block}; {how}")
    return out


def _bnb4_linear(em: Emitter, node: fx.Node, x, w: fx.Node, b) -> str | None:
    packed, absmax, g = w.args[:3]
    p, a = em.const_of(packed), em.const_of(absmax)
    if p is None or a is None or p.dim() != 2:
        return None
    n, k = p.shape[0], p.shape[1] * 2
    codes = unpack_int4(p).reshape(-1).numpy()
    bnb = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)  # bitsandbytes order: first code high
    path = module_path(node) or node.name
    bi = em.tag(em.init(bnb, f"{path}.weight:nf4", share=False), node.name, "codes", n * k)
    ai = em.tag(em.init(a.float().reshape(-1).contiguous(), f"{path}.weight:absmax", share=False), node.name,
                "scales")
    y = em.add("MatMulBnb4", [em.value(x), bi, ai], node, domain=MS, suffix="/MatMulBnb4" if b is not None else "",
               K=k, N=n, block_size=int(g), quant_type=1)
    double = " (double-quantized scales stored as fp32)" if absmax.op == "call_function" else ""
    em.out.kernel_notes[node.name] = ("MatMulBnb4", (
        f"nf4 group {g}, fp32 absmax{double}; codes decoded block by block (slower than fp32 MatMul on "
        f"ORT-CPU: the file shrinks, the run does not speed up)"))
    return em.add("Add", [y, _float_bias(em, node, b)], node) if b is not None else y


def _lowbit_weight(w) -> bool:
    """A weight the reference quantized (int / NF4 constant behind a dequantize)."""
    if not isinstance(w, fx.Node) or w.op != "call_function" or not w.args or not isinstance(w.args[0], fx.Node):
        return False
    return (w.target in LOWBIT_DQ_OPS or w.target in DQ_OPS) and w.args[0].op == "get_attr"


def linear(em: Emitter, node: fx.Node):
    x, w, b = node.args[0], node.args[1], arg(node, 2, "bias")
    if isinstance(x, fx.Node) and x.target == DYNAMIC_DQ and _lowbit_weight(w) and w.target in DQ_OPS:
        return _dynamic_linear(em, node, x, w, b)
    static_input = isinstance(x, fx.Node) and x.target in DQ_OPS
    if not static_input and _lowbit_weight(w):
        out = (_bnb4_linear if w.target == qc.dequantize_nf4.default else _nbits_linear)(em, node, x, w, b)
        if out is not None:
            return out
    return ops.linear(em, node)


def embedding(em: Emitter, node: fx.Node):
    """int8 rows with one scale per row (axis 0): Gather the codes and the row scales, then multiply."""
    table, ids = node.args[0], node.args[1]
    if isinstance(table, fx.Node) and table.name in em.lazy and table.target in DQ_OPS:
        q, s, z, axis = weight_info(em, table)
        if axis == 0 and q.dim() == 2:
            path = module_path(node) or node.name
            v, d = q.shape
            qi = em.tag(em.init(q, f"{path}.weight", share=False), node.name, "codes", v * d)
            si = em.tag(em.init(s.float().reshape(v, 1), f"{path}.weight:row_scales", share=False),
                        node.name, "scales")
            idx = em.value(ids)
            rows = em.add("Cast", [em.add("Gather", [qi, idx], node, suffix="/gather_int8", axis=0)], node,
                          suffix="/cast", to=onnx_float())
            if bool((z != 0).any()):
                zi = em.tag(em.init(z.float().reshape(v, 1), f"{path}.weight:row_zero_points", share=False),
                            node.name, "zero_points")
                rows = em.add("Sub", [rows, em.add("Gather", [zi, idx], node, suffix="/gather_zp", axis=0)], node,
                              suffix="/sub_zp")
            scale = em.add("Gather", [si, idx], node, suffix="/gather_scale", axis=0)
            em.out.kernel_notes[node.name] = ("Gather", "int8 rows gathered, then scaled per row")
            return em.add("Mul", [rows, scale], node)
    return ops_shape.embedding(em, node)


def lowbit_dequantize(em: Emitter, node: fx.Node):
    """Lazy: a linear reads the packed weight itself; any other reader gets the weight dequantized to fp32
    here (an initializer: the file loses the size benefit for that tensor, noted in the report)."""
    def emit(e: Emitter, n: fx.Node):
        value = _evaluate(n, e.consts)
        e.out.notes.append(f"{n.name}: low-bit weight read by a non-linear op, stored dequantized (fp32)")
        out = e.init(value.float(), f"{module_path(n) or n.name}.weight_dequantized", share=False)
        e.env[n.name] = out
        return out
    em.lazy[node.name] = emit
    return None


OPS: dict = {
    qd.choose_qparams.tensor: OpEntry(choose_qparams, "DynamicQuantizeLinear"),
    qd.quantize_per_tensor.tensor: OpEntry(quantize_dynamic, "DynamicQuantizeLinear"),
    qd.dequantize_per_tensor.tensor: OpEntry(dequantize_dynamic, "DequantizeLinear"),
    qd.dequantize_per_channel_group.default: OpEntry(lowbit_dequantize, "MatMulNBits"),
    qc.dequantize_nf4.default: OpEntry(lowbit_dequantize, "MatMulBnb4"),
    aten.linear.default: OpEntry(linear, "Gemm/MatMul/MatMulInteger/MatMulNBits"),
    aten.embedding.default: OpEntry(embedding, "Gather"),
}
