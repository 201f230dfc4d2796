"""x86 static lowering rules: one :class:`~qcompile.passes.rewrite.Rule` per support-table row.

A rule's pattern is its row's op chain (``dequantize -> op(s) -> quantize`` groups of the reference
graph); ``rewrite(match)`` runs with ``match.ctx`` the :class:`~.lower.Lowerer` and ``match.user`` the
group's output quantize node, and returns :class:`Emitted` (the kernel's quantized output) or a reason
string when it declines (the group stays float and the report shows the reason).
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile.gptq import codes_break_pair_bound
from qcompile.ir import get_attr_value
from qcompile.kernels import u8_bmm, u8_bmm_available
from qcompile.passes.rewrite import Match, Rule, RuleSet

from . import support
from .kernel_choice import available_families, cpu_has_vnni, engine_family, example_input, quantized_engine
from .lower import _DQ, _DQ_W, _Q, Emitted, Value, _int_weight, _qparams

aten, qops = torch.ops.aten, torch.ops.quantized


def _arg(node, i, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(("stride", "padding", "dilation", "groups")[i - 3], default)


def _bias(lw, node):
    b = node.args[2] if len(node.args) > 2 else None
    return None if b is None else get_attr_value(lw.ref, b).detach().float()


def _int8_operands(m: Match):
    """(quantized input Value, int8 weight) of a weighted group, or the reason it cannot run in int8."""
    anchor = m.nodes[0]
    x = m.ctx.quantized_input(anchor.args[0])
    if x is None:
        return "input is not a quantized tensor"
    if anchor.args[1].target not in _DQ_W:
        return "weight is not quantized"
    bias = anchor.args[2] if len(anchor.args) > 2 else None
    if isinstance(bias, fx.Node) and bias.op != "get_attr":
        return "bias is computed at run time (not a constant); the int8 kernels pack a constant bias"
    qw = _int_weight(m.ctx.ref, anchor.args[1])
    why = _saturates_here(anchor, qw)
    return why if why else (x, qw)


def _saturates_here(anchor, qw) -> str | None:
    """Why this CPU's int8 kernels cannot compute the group exactly, or None. Without VNNI every int8 kernel
    (fbgemm, oneDNN's AVX2 path) adds two u8 x s8 products in int16: codes quantized on a VNNI CPU (8-bit GEMM
    weights, full-range depthwise weights) with full-range u8 activations can saturate it. A graph compiled
    here never has them (7-bit / pair_sum weights); one compiled on a VNNI CPU and loaded here does."""
    if cpu_has_vnni():
        return None
    dq = anchor.args[0]
    levels = int(dq.args[4]) - int(dq.args[3]) if getattr(dq, "target", None) in _DQ and len(dq.args) > 4 else 255
    if levels <= 127 or not codes_break_pair_bound(qw.int_repr()):
        return None  # 7-bit activations, or no two same-sign codes past 128: 255 * 128 <= 32767
    return ("weights quantized for a CPU with VNNI (exact int32 dot products); this CPU's int8 kernels add u8 x s8 "
            "pairs in int16, which these codes would saturate: runs in float here. Compile on this CPU for int8")


def _fp32_output_operands(m: Match):
    """(quantized input Value, int8 weight) for an int8 kernel with an fp32 result, or the reason it cannot run:
    these kernels (fbgemm's linear, oneDNN's conv) take uint8 activations."""
    operands = _int8_operands(m)
    if isinstance(operands, str):
        return operands
    if m.nodes[0].args[0].args[5] != torch.uint8:
        return "the fp32-output int8 kernel takes uint8 activations"
    return operands


def _weighted(m: Match, prepack, kernels, kernel_name):
    lw, nodes, q = m.ctx, m.nodes, m.user
    anchor = nodes[0]
    operands = _int8_operands(m)
    if isinstance(operands, str):
        return operands
    x, qw = operands
    scale, zp, _ = _qparams(q)
    tail = tuple(n.target for n in nodes[1:])
    kernel = kernels[len(tail) > 0 and tail[0] == aten.relu.default]
    packed = _pack(lw, anchor, prepack, qw, kernel, x, scale, zp)
    if isinstance(packed, str):
        return packed
    value, family = packed
    out = lw.call(kernel, (x.node, lw.constant(value, "packed"), scale, zp), anchor)
    if tail and tail[0] == aten.hardtanh.default:  # relu6: clamp the quantized output
        out = lw.call(aten.hardtanh.default, (out, 0.0, 6.0), nodes[-1])
    name = kernel_name + ("_relu" if kernel is kernels[True] else "")
    return Emitted(Value(out, True, scale, zp), f"{name} ({family})" if family else name)


def _pack(lw, anchor, prepack, qw, kernel, x, scale, zp):
    """Pack the weight for the engine in force, or (``engine="auto"``) for each kernel family, keeping the
    one measured fastest on this layer's input shape (kernel_choice.py). Returns (packed, family note), or the
    reason the weight cannot be packed here. A grouped (depthwise) conv weight whose codes break fbgemm's int16
    pair bound is packed for oneDNN only: the backend gives every grouped conv the pair_sum range
    (``backend._is_depthwise``), and conv_weights.py widens them all."""
    bias = _bias(lw, anchor)
    if int(_arg(anchor, 6, 1)) > 1 and codes_break_pair_bound(qw.int_repr()):
        # full-range grouped-conv weights (conv_weights.py): fbgemm's depthwise kernel adds u8 x s8 pairs in int16
        # and would saturate; oneDNN sums them in int32 on VNNI
        if "onednn" not in available_families():
            return "full-range depthwise weights need oneDNN's int8 conv, which this torch build lacks"
        with quantized_engine("onednn"):
            return prepack(anchor, qw, bias), ("onednn: full-range 8-bit weights (fbgemm's int16 pair sums would "
                                               "saturate; oneDNN's VNNI sums are exact)")
    chooser, families = getattr(lw, "engine_chooser", None), available_families()
    measurable = chooser is not None and len(families) > 1 and anchor.target != aten.conv1d.default
    # conv1d: oneDNN's own packing of a conv1d weight fails at run time (torch 2.13), torch's x86 rule works
    xq = example_input(anchor, qw, x.scale, x.zero_point) if measurable else None
    if xq is None:
        kind = "conv" if "conv" in str(anchor.target) else "linear"
        symmetric = bool((qw.q_per_channel_zero_points() == 0).all()) if qw.qscheme() in (
            torch.per_channel_affine, torch.per_channel_symmetric) else qw.q_zero_point() == 0
        family = engine_family(torch.backends.quantized.engine, kind, int(_arg(anchor, 6, 1)), symmetric)
        return prepack(anchor, qw, bias), family
    packs = {}
    for fam in families:
        with quantized_engine(fam):
            packs[fam] = prepack(anchor, qw, bias)
    key = f"{kernel}|x{tuple(xq.shape)}|w{tuple(qw.shape)}|{[_arg(anchor, i, None) for i in (3, 4, 5, 6)]}"
    choice = chooser.choose(key, {f: (lambda p=p: kernel(xq, p, scale, zp)) for f, p in packs.items()})
    return packs[choice.family], choice.note()


def _conv_prepack(node, qw, bias):
    stride, padding = _arg(node, 3, [1, 1]), _arg(node, 4, [0, 0])
    dilation, groups = _arg(node, 5, [1, 1]), _arg(node, 6, 1)
    return qops.conv2d_prepack(qw, bias, list(stride), list(padding), list(dilation), int(groups))


def _conv1d_prepack(node, qw, bias):
    stride, padding = _arg(node, 3, [1]), _arg(node, 4, [0])
    dilation, groups = _arg(node, 5, [1]), _arg(node, 6, 1)
    return qops.conv1d_prepack(qw, bias, list(stride), list(padding), list(dilation), int(groups))


def _linear_prepack(node, qw, bias):
    return qops.linear_prepack(qw, bias)


def conv2d(m: Match):
    if m.user is None or m.user.target not in _Q:
        return _conv2d_float_output(m)
    return _weighted(m, _conv_prepack, {False: qops.conv2d.new, True: qops.conv2d_relu.new},
                     "quantized::conv2d")


conv2d.float_output = True  # groups left without an output quantize (passes/float_output.py) lower here too

CONV_FLOAT_OUTPUT_KERNEL = "onednn::qconv2d_pointwise"


def conv_float_output_available() -> bool:
    """oneDNN's int8 conv with an fp32 result (torch.ops.onednn.qconv2d_pointwise) is in this torch build."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def _conv2d_float_output(m: Match):
    """int8 conv with an fp32 result (oneDNN, what Inductor's x86 int8 path runs): the group's consumers are
    float, its output is not quantized. The kernel takes the int8 input's codes and writes fp32, bias added and
    relu fused, with no requantize (one rounding fewer than conv + quantize + dequantize)."""
    lw, nodes = m.ctx, m.nodes
    anchor = nodes[0]
    if not conv_float_output_available():
        return "this torch build has no oneDNN int8 conv with an fp32 output"
    operands = _fp32_output_operands(m)
    if isinstance(operands, str):
        return operands
    x, qw = operands
    if qw.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        w_scales, w_zps = qw.q_per_channel_scales().float(), qw.q_per_channel_zero_points()
    else:
        w_scales = torch.full((qw.shape[0],), qw.q_scale(), dtype=torch.float32)
        w_zps = torch.full((qw.shape[0],), qw.q_zero_point(), dtype=torch.long)
    if bool((w_zps != 0).any()):
        return "the fp32-output int8 conv (oneDNN) takes symmetric weights"
    stride, padding = list(_arg(anchor, 3, [1, 1])), list(_arg(anchor, 4, [0, 0]))
    dilation, groups = list(_arg(anchor, 5, [1, 1])), int(_arg(anchor, 6, 1))
    if isinstance(padding, str) or any(isinstance(v, str) for v in padding):
        return "string padding: the fp32-output int8 conv takes explicit padding"
    packed = torch.ops.onednn.qconv_prepack(qw.int_repr(), w_scales, float(x.scale), int(x.zero_point), stride,
                                           padding, dilation, groups, None)
    bias = _bias(lw, anchor)
    relu = len(nodes) > 1 and nodes[1].target in (aten.relu.default, aten.relu_.default)
    if len(nodes) > 1 and not relu:
        return "the fp32-output int8 conv fuses relu only"
    codes = lw.call(torch.Tensor.int_repr, (x.node,), anchor)
    out = lw.call(torch.ops.onednn.qconv2d_pointwise.default,
                  (codes, float(x.scale), int(x.zero_point), lw.constant(packed, "packed"),
                   lw.constant(w_scales, "w_scales"), lw.constant(torch.zeros_like(w_zps), "w_zps"),
                   None if bias is None else lw.constant(bias, "bias"), stride, padding, dilation, groups, 1.0, 0,
                   torch.float32, "relu" if relu else "none", [], ""), anchor)
    return Emitted(Value(out), f"{CONV_FLOAT_OUTPUT_KERNEL} (oneDNN; int8 conv, fp32 output, no requantize)")


def conv1d(m: Match):
    return _weighted(m, _conv1d_prepack, {False: qops.conv1d.default, True: qops.conv1d_relu.default},
                     "quantized::conv1d")


def linear(m: Match):
    if m.user is None or m.user.target not in _Q:
        return _linear_float_output(m)
    return _weighted(m, _linear_prepack, {False: qops.linear.default, True: qops.linear_relu.default},
                     "quantized::linear")


linear.float_output = True  # groups left without an output quantize (passes/float_output.py) lower here too

FLOAT_OUTPUT_KERNEL = "quantized::linear_with_input_q_dq_qweight_dq_output_fp32"


def _linear_float_output(m: Match):
    """int8 GEMM with an fp32 result (fbgemm): the group's consumers are float, its output is not quantized.
    The kernel quantizes its float input itself with the input's parameters: given the float a native
    quantize made the int8 input from (or its dequantized copy), it computes on exactly that int8 input."""
    lw, nodes = m.ctx, m.nodes
    anchor = nodes[0]
    operands = _fp32_output_operands(m)
    if isinstance(operands, str):
        return operands
    x, qw = operands
    engine = torch.backends.quantized.engine
    if engine in ("x86", "fbgemm"):
        family = engine_family(engine, "linear", 1, True)
    else:
        engine, family = "x86", f"fbgemm: oneDNN ({engine!r}) has no int8 linear with an fp32 output"
    with quantized_engine(engine):
        packed = _linear_prepack(anchor, qw, _bias(lw, anchor))
    out = lw.call(qops.linear_with_input_q_dq_qweight_dq_output_fp32.default,
                  (lw.float_input(anchor.args[0]), x.scale, x.zero_point, lw.constant(packed, "packed")), anchor)
    if len(nodes) > 1:  # linear -> relu: the relu on the fp32 result
        out = lw.call(torch.relu, (out,), nodes[-1])
    return Emitted(Value(out), f"{FLOAT_OUTPUT_KERNEL} ({family}; int8 GEMM, fp32 output, no requantize)")


def _binary(kernel, name):
    """A two-quantized-input rule; ``name`` is the report's kernel label (or a function giving it)."""
    def rule(m: Match):
        lw, nodes, q = m.ctx, m.nodes, m.user
        a, b = (lw.quantized_input(x) for x in nodes[0].args[:2])
        if a is None or b is None:
            return "both inputs must be quantized tensors"
        scale, zp, _ = _qparams(q)
        out = lw.call(kernel, (a.node, b.node, scale, zp), nodes[0])
        return Emitted(Value(out, True, scale, zp), name() if callable(name) else name)
    return rule


def _lut(node, in_scale, in_zp, out_scale, out_zp, out_dtype, qmin, qmax) -> torch.Tensor:
    """256-entry table: exactly the reference's quantize(op(dequantize(i))) for every uint8 input i."""
    levels = torch.arange(256, dtype=torch.float32)
    x = (levels - in_zp) * in_scale
    y = node.target(x, *node.args[1:])
    return torch.ops.quantized_decomposed.quantize_per_tensor.default(y, out_scale, out_zp, qmin, qmax, out_dtype)


def unary_lut(m: Match):
    """Unary elementwise op (hardswish, sigmoid, ...) as a table lookup on the uint8 codes: bit-exact with
    the reference graph, where quantized::hardswish rounds differently (measured on MobileNetV2)."""
    lw, node, q = m.ctx, m.anchor, m.user
    x = lw.quantized_input(node.args[0])
    if x is None:
        return "input is not a quantized tensor"
    scale, zp, dtype = _qparams(q)
    table = lw.constant(_lut(node, x.scale, x.zero_point, scale, zp, dtype, int(q.args[3]), int(q.args[4])), "lut")
    codes = lw.call(torch.Tensor.int_repr, (x.node,), node)
    idx = lw.call(torch.Tensor.long, (codes,), node)
    out_codes = lw.call(torch.Tensor.__getitem__, (table, idx), node)
    out = lw.call(torch._make_per_tensor_quantized_tensor, (out_codes, scale, zp), node)
    return Emitted(Value(out, True, scale, zp), f"int8 lookup table ({node.target.__name__})")


def same_op(m: Match):
    """Ops whose quantized kernel keeps (SHARED) or fixes (FIXED) the parameters: run the aten op as is."""
    lw, node, q = m.ctx, m.anchor, m.user
    x = lw.quantized_input(node.args[0])
    if x is None:
        return "input is not a quantized tensor"
    scale, zp, _ = _qparams(q)
    args = (x.node, *[lw.as_float(a) for a in node.args[1:]])
    out = lw.call(node.target, args, node)
    return Emitted(Value(out, True, scale, zp), f"{node.target.__name__} (int8)")


def int8_matmul(a, b, scale: float | None, zero_point: int = 0):
    """quint8 ``a [..., M, K] @ b [..., K, N]`` -> quint8, or fp32 when ``scale`` is None (every consumer
    is float: no requantize). On AVX-512 VNNI CPUs qcompile's own batched kernel (``csrc/int8_bmm.c``: every
    slice in one call, operands read in place, requantized in the same pass); elsewhere
    :func:`int8_matmul_int_mm`."""
    out = u8_bmm(a, b, scale, zero_point)
    return out if out is not None else int8_matmul_int_mm(a, b, scale, zero_point)


def int8_matmul_int_mm(a, b, scale: float | None, zero_point: int = 0):
    """The portable path: int8 x int8 -> int32 per batch slice (``torch._int_mm``, exact), zero points
    removed with row / column sums, one float requantize (none when ``scale`` is None: fp32 result).
    ``u ^ 0x80`` viewed as int8 is ``u - 128``: the codes shift to signed and the zero points with them."""
    za, zb = a.q_zero_point() - 128, b.q_zero_point() - 128
    ai = (a.contiguous().int_repr() ^ 128).view(torch.int8)  # int_repr of a strided view is a slow
    bi = (b.contiguous().int_repr() ^ 128).view(torch.int8)  # element loop; a quantized copy is not
    *batch, m, k = ai.shape
    n = bi.shape[-1]
    a3, b3 = ai.reshape(-1, m, k), bi.reshape(-1, k, n)
    acc = torch.empty(a3.shape[0], m, n, dtype=torch.int32)
    for x, y, out in zip(a3.unbind(0), b3.unbind(0), acc.unbind(0)):  # views made in C++, not 3 indexings each
        torch._int_mm(x, y, out=out)
    if zb:
        acc -= zb * a3.sum(-1, dtype=torch.int32)[:, :, None]
    if za:
        acc -= za * b3.sum(-2, dtype=torch.int32)[:, None, :]
    if za and zb:
        acc += k * za * zb
    y = acc.reshape(*batch, m, n).float() * (a.q_scale() * b.q_scale())
    return y if scale is None else torch.quantize_per_tensor(y, scale, zero_point, torch.quint8)


def _matmul_kernel() -> str:
    return ("qcompile int8_matmul (own AVX-512 VNNI batched kernel, int32 exact)" if u8_bmm_available() else
            "qcompile int8_matmul (torch._int_mm per batch slice, int32 exact: no AVX-512 VNNI or no C extension)")


_matmul_requantized = _binary(int8_matmul, _matmul_kernel)


def matmul(m: Match):
    """matmul(dq a, dq b) -> q  ->  int8_matmul(qa, qb); left without an output quantize
    (passes/float_output.py: Q.K^T feeding the float score scale / mask / softmax), the same kernel writes fp32."""
    if m.user is not None and m.user.target in _Q:
        return _matmul_requantized(m)
    lw, node = m.ctx, m.nodes[0]
    a, b = (lw.quantized_input(x) for x in node.args[:2])
    if a is None or b is None:
        return "both inputs must be quantized tensors"
    out = lw.call(int8_matmul, (a.node, b.node, None), node)
    return Emitted(Value(out), _matmul_kernel().replace("int32 exact", "int32 exact, fp32 output, no requantize"))


matmul.float_output = True

_LOWER = {  # support-table row -> rewrite; each group is dequantize -> ops -> quantize in the reference graph
    "matmul": matmul,                    # matmul(dq a, dq b) -> q  ->  int8_matmul(qa, qb)
    "conv2d": conv2d,                    # conv2d(dq x, dq w) -> q  ->  quantized::conv2d(qx, packed)
    "conv2d_relu": conv2d,               # conv2d -> relu -> q  ->  quantized::conv2d_relu
    "conv2d_relu6": conv2d,              # conv2d -> hardtanh(0, 6) -> q  ->  quantized::conv2d -> hardtanh(q)
    "conv1d": conv1d,                    # conv1d(dq x, dq w) -> q  ->  quantized::conv1d(qx, packed)
    "conv1d_relu": conv1d,               # conv1d -> relu -> q  ->  quantized::conv1d_relu
    "linear": linear,                    # linear(dq x, dq w) -> q  ->  quantized::linear(qx, packed)
    "linear_relu": linear,               # linear -> relu -> q  ->  quantized::linear_relu
    "add": _binary(qops.add.default, "quantized::add"),                 # add(dq a, dq b) -> q  ->  quantized::add
    "add_relu": _binary(qops.add_relu.default, "quantized::add_relu"),  # add -> relu -> q  ->  quantized::add_relu
    "mul": _binary(qops.mul.default, "quantized::mul"),                 # mul(dq a, dq b) -> q  ->  quantized::mul
    "hardswish": unary_lut,              # hardswish(dq x) -> q  ->  table[int_repr(qx)]
    "sigmoid": unary_lut,                # sigmoid(dq x) -> q  ->  table[int_repr(qx)]
    "hardsigmoid": unary_lut,            # hardsigmoid(dq x) -> q  ->  table[int_repr(qx)]
    **{name: same_op for name in (       # op(dq x) -> q (same or fixed parameters)  ->  op(qx)
        "relu", "relu6", "max_pool2d", "adaptive_avg_pool2d", "avg_pool2d", "mean", "flatten", "reshape", "permute",
        "unflatten", "unsqueeze", "squeeze", "select")},
}

RULES = RuleSet(Rule(row.name, row.ops, rewrite=_LOWER[row.name]) for row in support.TABLE if row.name in _LOWER)
