"""Pre-export pass: a copy of the reference graph in the form ``torch.onnx.export`` should translate.

The reference graph itself is never changed (it stays the contract ``verify`` compares with). On a copy:

* every node is stamped with its reference name (``meta["custom"]["qcompile_ref"]``, which torch.export
  and torch.onnx's decompositions carry along), so each ONNX node traces back to a reference node;
* QDQ layouts ORT fuses best: an N-D linear becomes ``MatMul(x, DQ(W^T int8, axis=1)) + DQ(int32 bias)``
  (torch_lib would write Transpose(DQ(W))); an int8 embedding table is gathered *before* dequantizing;
* dynamic mode: ``choose_qparams -> quantize`` becomes ``dynamic_quantize`` (DynamicQuantizeLinear) and a
  linear reading it with an int8 weight becomes ``matmul_integer`` (MatMulInteger + scales);
* weight-only mode: low-bit linears become ``matmul_nbits`` / ``matmul_bnb4``, int8 embedding rows
  ``embedding_rows``; a low-bit weight read by anything else is stored dequantized (fp32, noted).

New constants are registered under recorded ONNX initializer names with storage tags (``Prepared``).
The custom ops and their ONNX translations are in ``custom_ops.py``; everything else goes to torch_lib.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from qcompile import meta
from qcompile.ir import add_constant, erase_dead_params, get_attr_value, module_path

from . import custom_ops as C
from .lowbit_pack import accuracy_level, nbits_layout

aten, qd, qc = torch.ops.aten, torch.ops.quantized_decomposed, torch.ops.qcompile
REF = meta.ONNX_REF
W_DQ = {qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default}
LOWBIT_DQ = {qd.dequantize_per_channel_group.default, qc.dequantize_nf4.default}


@dataclass
class Prepared:
    gm: fx.GraphModule
    names: dict = field(default_factory=dict)         # buffer -> ONNX initializer name
    storage: dict = field(default_factory=dict)       # ONNX initializer name -> (reference layer, role, weights)
    kernel_notes: dict = field(default_factory=dict)  # reference node -> (ONNX op, what ORT runs for it)
    notes: list = field(default_factory=list)


def ref_name(node: fx.Node) -> str:
    return meta.custom_get(node, REF, node.name)


class _Builder:
    def __init__(self, gm: fx.GraphModule, accuracy: int | None):
        self.gm, self.accuracy, self.out = gm, accuracy, Prepared(gm)

    def const(self, value: torch.Tensor, name: str, before: fx.Node, layer: str, role: str, weights: int = 0):
        node = add_constant(self.gm, name, value.contiguous(), before)
        self.out.names[node.target] = name
        self.out.storage.setdefault(name, (layer, role, int(weights)))
        return node

    def call(self, target, args: tuple, anchor: fx.Node, before: fx.Node | None = None) -> fx.Node:
        """A new node that carries ``anchor``'s module path, source line and reference name."""
        with self.gm.graph.inserting_before(before or anchor):
            node = self.gm.graph.call_function(target, args)
        for key in ("nn_module_stack", "stack_trace", "custom"):
            if key in anchor.meta:
                node.meta[key] = anchor.meta[key]
        return node

    def bias(self, b, node: fx.Node):
        """A float bias constant, tagged for the storage report (None stays None)."""
        if isinstance(b, fx.Node) and b.op == "get_attr":
            self.out.storage.setdefault(self.out.names.setdefault(b.target, f"{_path(node)}.bias"),
                                        (ref_name(node), "bias", 0))
        return b


def _path(node: fx.Node) -> str:
    return module_path(node) or ref_name(node)


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _rank(node) -> int:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _weight(gm: fx.GraphModule, dq) -> tuple | None:
    """(int codes, fp32 scale, zero point, axis or None) behind a per-tensor / per-channel weight DQ."""
    if not (isinstance(dq, fx.Node) and dq.target in W_DQ and isinstance(dq.args[0], fx.Node)
            and dq.args[0].op == "get_attr"):
        return None
    q = get_attr_value(gm, dq.args[0])
    if dq.target == qd.dequantize_per_tensor.default:
        return q, torch.tensor(float(dq.args[1])), torch.tensor(int(dq.args[2])), None
    s, z = get_attr_value(gm, dq.args[1]), get_attr_value(gm, dq.args[2])
    return q, s.float(), z, int(dq.args[3]) % q.dim()


# ----------------------------------------------------------------------------- static
def nd_linear(b: _Builder, node: fx.Node) -> bool:
    """linear(x N-D, DQ(W)) -> matmul(x, DQ(W^T int8, axis 1)) [+ bias]: int8 weights stay initializers."""
    x, w, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
    info = _weight(b.gm, w)
    if _rank(x) <= 2 or info is None or info[0].dim() != 2 or not _is_static_dq(x):
        return False
    q, s, z, axis = info
    path, name = _path(node), ref_name(node)
    qt = b.const(q.t(), f"{path}.weight.T", node, name, "codes", q.numel())
    if axis is None:
        dq = b.call(qd.dequantize_per_tensor.default, (qt, *w.args[1:6]), node)
    else:
        st = b.const(s.reshape(-1), f"{path}.weight.T:scale", node, name, "scales")
        zt = b.const(z.reshape(-1), f"{path}.weight.T:zero_point", node, name, "zero_points")
        dq = b.call(qd.dequantize_per_channel.default, (qt, st, zt, 1, *w.args[4:7]), node)
    y = b.call(aten.matmul.default, (x, dq), node)
    if bias is not None:
        y = b.call(aten.add.Tensor, (y, b.bias(bias, node)), node)
    node.replace_all_uses_with(y)
    b.gm.graph.erase_node(node)
    return True


def _is_static_dq(x) -> bool:
    return isinstance(x, fx.Node) and x.target == qd.dequantize_per_tensor.default


def gather_then_dequantize(b: _Builder, node: fx.Node) -> bool:
    """embedding(DQ(int8 table per tensor / per hidden column), ids) -> DQ(embedding(int8 table, ids))."""
    table, ids = node.args[0], node.args[1]
    info = _weight(b.gm, table)
    if info is None or info[3] not in (None, 1) or info[0].dim() != 2:
        return False
    rows = b.call(aten.embedding.default, (table.args[0], ids), node)
    r = _rank(node)
    if info[3] is None:
        dq = b.call(qd.dequantize_per_tensor.default, (rows, *table.args[1:6]), node)
    else:
        dq = b.call(qd.dequantize_per_channel.default, (rows, table.args[1], table.args[2], r - 1, *table.args[4:7]),
                    node)
    node.replace_all_uses_with(dq)
    b.gm.graph.erase_node(node)
    return True


# ----------------------------------------------------------------------------- dynamic
def dynamic_quantize(b: _Builder, node: fx.Node) -> bool:
    """choose_qparams.tensor(x) + quantize_per_tensor.tensor(x, s, z) -> dynamic_quantize(x): (q, s, z)."""
    x, qmin, qmax, eps, dtype = node.args[:5]
    if (qmin, qmax, dtype) != (0, 255, torch.uint8):
        return False
    got = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    if set(got) != {0, 1} or len(node.users) != 2:
        return False
    dq = b.call(C.Q.dynamic_quantize.default, (x, float(eps)), node)
    outs = [b.call(operator.getitem, (dq, i), node) for i in range(3)]
    for q in [u for u in got[0].users if u.target == qd.quantize_per_tensor.tensor and u.args[0] is x]:
        q.replace_all_uses_with(outs[0])
        b.gm.graph.erase_node(q)
    got[0].replace_all_uses_with(outs[1])
    got[1].replace_all_uses_with(outs[2])
    for n in (got[0], got[1], node):
        b.gm.graph.erase_node(n)
    return True


def dynamic_linear(b: _Builder, node: fx.Node) -> bool:
    x, w, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
    info = _weight(b.gm, w)
    if not (isinstance(x, fx.Node) and x.target == qd.dequantize_per_tensor.tensor and info is not None):
        return False
    src = x.args[0]
    if not (isinstance(src, fx.Node) and src.target is operator.getitem and src.args[0].target == C.Q.dynamic_quantize.default):
        return False
    q, s, z, axis = info
    if q.dim() != 2 or q.dtype != torch.int8:
        return False
    path, name = _path(node), ref_name(node)
    shape = (-1,) if axis is not None else ()
    wt = b.const(q.t(), f"{path}.weight.T", node, name, "codes", q.numel())
    ws = b.const(s.reshape(shape), f"{path}.weight.T:scale", node, name, "scales")
    wz = b.const(z.to(torch.int8).reshape(shape), f"{path}.weight.T:zero_point", node, name,
                 "zero_points") if bool((z != 0).any()) else None
    y = b.call(C.Q.matmul_integer.default, (src, x.args[1], x.args[2], wt, ws, wz, b.bias(bias, node)), node)
    node.replace_all_uses_with(y)
    b.gm.graph.erase_node(node)
    gran = "per channel" if axis is not None else "per tensor"
    b.out.kernel_notes[name] = ("MatMulInteger", f"uint8 activations quantized at run time x int8 weights {gran}, "
                                                 f"int32 accumulation")
    return True


# ----------------------------------------------------------------------------- weight-only
def nbits_linear(b: _Builder, node: fx.Node) -> bool:
    from qcompile.int_weight import int_weight
    x, w, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
    if _is_static_dq(x) or not isinstance(w, fx.Node) or w.target not in (W_DQ | {qd.dequantize_per_channel_group.default}):
        return False
    if isinstance(x, fx.Node) and x.target == qd.dequantize_per_tensor.tensor:
        return False  # a dynamic linear that dynamic_linear did not claim keeps the QDQ form
    iw = int_weight(b.gm, w)
    lay = nbits_layout(iw) if iw is not None and iw.q.dim() == 2 else None
    if lay is None:
        return False
    path, name = _path(node), ref_name(node)
    bi = b.const(lay.b, f"{path}.weight:nbits", node, name, "codes", lay.n * lay.k)
    si = b.const(lay.scales, f"{path}.weight:scales", node, name, "scales")
    zi = None if lay.zero_points is None else b.const(lay.zero_points, f"{path}.weight:zero_points", node, name,
                                                      "zero_points")
    level = accuracy_level(b.accuracy, lay.bits)
    y = b.call(C.Q.matmul_nbits.default, (x, bi, si, zi, b.bias(bias, node), lay.k, lay.n, lay.bits, lay.block, level), node)
    node.replace_all_uses_with(y)
    b.gm.graph.erase_node(node)
    kind = "symmetric" if zi is None else "asymmetric"
    held = f"int{iw.bits}" + (f" in {lay.bits}-bit blocks" if lay.bits != iw.bits else "")
    g = iw.group_size
    grouping = f"group {g}" if g else ("per channel" if iw.scale.numel() > 1 else "per tensor")
    how = ("fp32 activations, weights unpacked block by block" if level in (0, 1) else
           f"accuracy_level={level}: activations quantized to int8 per block inside the kernel" if level == 4 else
           f"accuracy_level={level}")
    b.out.kernel_notes[name] = ("MatMulNBits", f"{held} {kind} {grouping}, block {lay.block}; {how}")
    return True


def bnb4_linear(b: _Builder, node: fx.Node) -> bool:
    from qcompile.lowbit import unpack_int4
    x, w, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
    if not (isinstance(w, fx.Node) and w.target == qc.dequantize_nf4.default):
        return False
    packed, absmax, g = w.args[:3]
    p, a = _constant(b.gm, packed), _constant(b.gm, absmax)
    if p is None or a is None or p.dim() != 2:
        return False
    n, k = p.shape[0], p.shape[1] * 2
    codes = unpack_int4(p).reshape(-1)
    bnb = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)  # bitsandbytes order: first code high
    path, name = _path(node), ref_name(node)
    bi = b.const(bnb, f"{path}.weight:nf4", node, name, "codes", n * k)
    ai = b.const(a.float().reshape(-1), f"{path}.weight:absmax", node, name, "scales")
    y = b.call(C.Q.matmul_bnb4.default, (x, bi, ai, k, n, int(g)), node)
    if bias is not None:
        y = b.call(aten.add.Tensor, (y, b.bias(bias, node)), node)
    node.replace_all_uses_with(y)
    b.gm.graph.erase_node(node)
    double = " (double-quantized scales stored as fp32)" if absmax.op == "call_function" else ""
    b.out.kernel_notes[name] = ("MatMulBnb4", (
        f"nf4 group {g}, fp32 absmax{double}; codes decoded block by block (slower than fp32 MatMul on "
        f"ORT-CPU: the file shrinks, the run does not speed up)"))
    return True


def embedding_rows(b: _Builder, node: fx.Node) -> bool:
    """embedding(DQ(int8 table, one scale per row), ids) -> embedding_rows (gather codes, then scale)."""
    table, ids = node.args[0], node.args[1]
    info = _weight(b.gm, table)
    if info is None or info[3] != 0 or info[0].dim() != 2:
        return False
    q, s, z, _ = info
    v, d = q.shape
    path, name = _path(node), ref_name(node)
    qi = b.const(q, f"{path}.weight", node, name, "codes", v * d)
    si = b.const(s.float().reshape(v, 1), f"{path}.weight:row_scales", node, name, "scales")
    zi = b.const(z.float().reshape(v, 1), f"{path}.weight:row_zero_points", node, name,
                 "zero_points") if bool((z != 0).any()) else None
    y = b.call(C.Q.embedding_rows.default, (ids, qi, si, zi), node)
    node.replace_all_uses_with(y)
    b.gm.graph.erase_node(node)
    b.out.kernel_notes[name] = ("Gather", "int8 rows gathered, then scaled per row")
    return True


def _constant(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The value of a node computed from constants alone (e.g. double-quantized NF4 scales), else None."""
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        return get_attr_value(gm, node)
    if node.op != "call_function":
        return None
    args = [_constant(gm, a) if isinstance(a, fx.Node) else a for a in node.args]
    if any(a is None for a, src in zip(args, node.args) if isinstance(src, fx.Node)):
        return None
    with torch.no_grad():
        return node.target(*args, **node.kwargs)


def fold_lowbit(b: _Builder, node: fx.Node) -> bool:
    """A low-bit weight read by a non-linear op: stored dequantized (fp32), noted."""
    value = _constant(b.gm, node)
    if value is None:
        return False
    const = b.const(value.float(), f"{_path(next(iter(node.users)))}.weight_dequantized", node, "", "float")
    node.replace_all_uses_with(const)
    b.gm.graph.erase_node(node)
    b.out.notes.append(f"{ref_name(node)}: low-bit weight read by a non-linear op, stored dequantized (fp32)")
    return True


# ----------------------------------------------------------------------------- the pass
RULES = [  # (targets, rewrite), applied in this order, each over the whole graph
    ({qd.choose_qparams.tensor}, dynamic_quantize),
    ({aten.linear.default}, dynamic_linear),
    ({aten.linear.default}, bnb4_linear),
    ({aten.linear.default}, nbits_linear),
    ({aten.linear.default}, nd_linear),
    ({aten.embedding.default}, embedding_rows),
    ({aten.embedding.default}, gather_then_dequantize),
    (LOWBIT_DQ, fold_lowbit),
]


def _contiguous_before_reshape(gm: fx.GraphModule) -> None:
    """A reshape of a non-contiguous tensor (attention's ``transpose(1, 2).reshape(b, t, d)``) gets an explicit
    contiguous copy first. torch.onnx's decomposition turns such a reshape into a ``view`` when the batch
    dimension is symbolic (dynamic batch) and then fails ("Cannot view a tensor with shape ... and strides");
    the copy is an Identity in ONNX, which has no strides."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.reshape.default:
            continue
        x = node.args[0]
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if isinstance(val, torch.Tensor) and not val.is_contiguous():
            with gm.graph.inserting_before(node):
                c = gm.graph.call_function(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
            c.meta.update(x.meta)
            c.meta["val"] = val.clone(memory_format=torch.contiguous_format)
            node.replace_input_with(x, c)


def prepare(ref: fx.GraphModule, accuracy: int | None = None) -> Prepared:
    """The rewritten copy of ``ref`` (``ref`` is left untouched)."""
    gm = fx.GraphModule(ref, copy.deepcopy(ref.graph))  # node meta is copied shallowly: replaced, never mutated
    for node in gm.graph.nodes:
        meta.custom_set(node, REF, node.name)
    b = _Builder(gm, accuracy)
    _contiguous_before_reshape(gm)
    for targets, rewrite in RULES:
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in targets and node.users:
                rewrite(b, node)
    erase_dead_params(gm)
    gm.recompile()
    return b.out

