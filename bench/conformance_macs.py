"""One MAC formula for every graph the conformance suite reads (torch.export / FX / edge / ONNX).

MACs of a GEMM-like op = (number of output elements) x (length of the reduction):
  conv (any rank, grouped included)   K = prod(weight.shape[1:])      (weight [Cout, Cin/groups, *kernel])
  conv_transpose                      MACs = numel(input) x prod(weight.shape[1:])
  linear                              K = weight.shape[-1]
  matmul / mm / bmm / addmm / baddbmm K = first operand's last dimension
  scaled_dot_product_attention        B·H·L·S·E (Q Kᵀ) + B·H·L·S·Ev (P V)
Elementwise ops, norms, softmax are not counted. The formula does not depend on how an op is
decomposed (linear -> view + mm, SDPA -> bmm pair give the same count), so a peer's graph and
qcompile's graph are measured alike. The *denominator* of every int8 share is the float model's
total, counted on its ``torch.export`` graph; numerators are the MACs of the GEMMs each tool runs in int8.
"""
from __future__ import annotations

import math

import torch
from torch import fx

_CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv"}
_CONV_T = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_MM = {"matmul", "mm", "bmm", "addmm", "baddbmm"}
GEMM_OPS = _CONV | _CONV_T | _MM | {"linear", "scaled_dot_product_attention"}


def op_short(target) -> str:
    """``aten.convolution.default`` / ``aten.conv2d.padding`` -> ``convolution`` / ``conv2d``."""
    packet = getattr(target, "overloadpacket", None)  # an OpOverload: its packet names the op, any overload
    if packet is not None and hasattr(packet, "__name__"):
        return packet.__name__.split(".")[-1]
    name = getattr(target, "__name__", None) or str(target)
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 and parts[-1] in ("default", "Tensor", "input", "out") else parts[-1]


def _shape(x):
    if isinstance(x, fx.Node):
        x = x.meta.get("val", x.meta.get("tensor_meta"))
    return tuple(int(d) for d in x.shape) if hasattr(x, "shape") else None


def gemm_macs(op: str, args: tuple, out_shape) -> int:
    """MACs of one op from its argument / output shapes (``args`` may hold fx nodes, tensors or meta)."""
    if out_shape is None:
        return 0
    out = math.prod(out_shape)
    try:
        if op in _CONV:
            return out * math.prod(_shape(args[1])[1:])
        if op in _CONV_T:
            return math.prod(_shape(args[0])) * math.prod(_shape(args[1])[1:])
        if op == "linear":
            return out * _shape(args[1])[-1]
        if op in ("addmm", "baddbmm"):
            return out * _shape(args[1])[-1]
        if op in _MM:
            return out * _shape(args[0])[-1]
        if op == "scaled_dot_product_attention":
            q, k = _shape(args[0]), _shape(args[1])
            return math.prod(q[:-1]) * k[-2] * q[-1] + out * k[-2]
    except (TypeError, IndexError):
        return 0
    return 0


def node_macs(node: fx.Node) -> int:
    if node.op != "call_function":
        return 0
    op = op_short(node.target)
    return gemm_macs(op, node.args, _shape(node)) if op in GEMM_OPS else 0


def live_nodes(graph: fx.Graph) -> set:
    """Nodes whose value reaches the graph's output. A GEMM whose result nobody reads (Hugging Face BERT's
    pooler when the wrapper returns the last hidden state) is work no tool needs to do: torch.export keeps
    it, qcompile's pipeline and eager forward hooks disagree on it, so no count includes it."""
    out = [n for n in graph.nodes if n.op == "output"]
    live, todo = set(out), list(out)
    while todo:
        for inp in todo.pop().all_input_nodes:
            if inp not in live:
                live.add(inp)
                todo.append(inp)
    return live


def graph_macs(gm: fx.GraphModule) -> int:
    """GEMM MACs of the live nodes of a graph whose nodes carry ``meta['val']`` (torch.export / edge graphs)."""
    live = live_nodes(gm.graph)
    return sum(node_macs(n) for n in gm.graph.nodes if n in live)


def float_total(model, args) -> int:
    """The denominator: GEMM MACs of the float model, on its torch.export graph (no decomposition), live nodes
    only (see ``live_nodes``)."""
    ep = torch.export.export(model, tuple(args))
    return graph_macs(ep.graph_module)


def dead_gemm_modules(model, args) -> set:
    """Paths of the modules (e.g. ``model.pooler.dense``) whose GEMMs are dead in the float export graph: a
    count made by forward hooks on the eager model skips them (see ``live_nodes``)."""
    ep = torch.export.export(model, tuple(args))
    live, dead = live_nodes(ep.graph_module.graph), set()
    for n in ep.graph_module.graph.nodes:
        if n not in live and node_macs(n):
            stack = n.meta.get("nn_module_stack") or {}
            if stack:
                dead.add(list(stack.values())[-1][0])
    return dead


# -- ONNX ---------------------------------------------------------------------------------------------
_ONNX_CONV = {"Conv", "ConvInteger", "QLinearConv"}
_ONNX_MM = {"MatMul", "MatMulInteger", "QLinearMatMul", "Gemm", "QGemm", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul"}
_ONNX_INT = {"ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat",
             "DynamicQuantizeMatMul"}
# (data input index, weight input index) of each op: QLinear* interleave scales and zero points
_ONNX_IO = {"QLinearConv": (0, 3), "QLinearMatMul": (0, 3), "QGemm": (0, 3)}


def onnx_int8_macs(model) -> tuple[int, int]:
    """(int8 GEMM MACs, all GEMM MACs) of an ONNX model with static shapes. A GEMM counts as int8 when
    it is an integer op (QLinearConv, MatMulInteger, ...) or a float Conv / MatMul / Gemm whose data and
    weight inputs both come from DequantizeLinear (a QDQ group ONNX Runtime fuses into an integer kernel)."""
    import onnx
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    shapes = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
    producer = {o: n for n in g.node for o in n.output}
    live, todo = set(), [o.name for o in g.output]
    while todo:  # nodes whose outputs reach a graph output (see live_nodes)
        p = producer.get(todo.pop())
        if p is not None and id(p) not in live:
            live.add(id(p))
            todo.extend(i for i in p.input if i)
    int8 = total = 0
    for n in g.node:
        if n.op_type not in _ONNX_CONV | _ONNX_MM or id(n) not in live:
            continue
        a_i, w_i = _ONNX_IO.get(n.op_type, (0, 1))
        a, w, out = shapes.get(n.input[a_i]), shapes.get(n.input[w_i]), shapes.get(n.output[0])
        if out is None or a is None or w is None:
            continue
        if n.op_type in _ONNX_CONV:
            macs = math.prod(out) * math.prod(w[1:])
        elif n.op_type in ("Gemm", "QGemm"):
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            macs = math.prod(out) * (a[0] if trans_a else a[-1])
        else:
            macs = math.prod(out) * a[-1]
        total += macs
        dq = lambda name: name in producer and producer[name].op_type == "DequantizeLinear"
        if n.op_type in _ONNX_INT or (dq(n.input[a_i]) and dq(n.input[w_i])):
            int8 += macs
    return int8, total


# -- FX graphs without shape metadata (torch.ao FX-converted models) ---------------------------------
class ShapeRecorder(fx.Interpreter):
    """Runs a GraphModule and records every node's argument and output shapes."""

    def __init__(self, gm):
        super().__init__(gm)
        self.shapes = {}

    def run_node(self, n):
        out = super().run_node(n)
        self.shapes[n] = out.shape if isinstance(out, torch.Tensor) else None
        return out
