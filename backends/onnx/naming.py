"""onnx-ir passes on torch.onnx's model: module-path names, the ``batch`` dimension, and the bookkeeping
(``Emitted``) that ties every ONNX node back to its reference node.

Every node torch.onnx writes carries ``pkg.torch.onnx.fx_node`` (the node of the program it translated);
that program's nodes carry the reference name ``prepare`` stamped. Names follow the reference graph:

* the ONNX nodes of reference node ``conv2d_1`` in module ``layer1.0.conv1``: the last one is
  ``layer1.0.conv1/conv2d_1``, earlier ones ``layer1.0.conv1/conv2d_1/<OpType>``;
* activation QuantizeLinear / DequantizeLinear: ``<producer>:q`` / ``<producer>:dq`` (the Q's output
  value is named like the node: the per-layer parity probe reads it);
* weight and int32-bias initializers ``<module>.weight`` / ``.bias`` with ``:scale`` / ``:zero_point``,
  dequantized by ``<module>.weight:dq`` (``.weight.T`` when stored transposed for MatMul).
"""
from __future__ import annotations

import re

import onnx_ir as ir
import torch
from torch import fx

from qcompile import meta
from qcompile.ir import module_path

from .emitted import Emitted, QInfo
from .prepare import REF, Prepared
from .rewrites import global_average_pool

qd = torch.ops.quantized_decomposed
_FX = re.compile(r"%(\S+) :")
_W_DQ = {qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default}


def _base(node: fx.Node) -> str:
    path = module_path(node)
    return f"{path}/{node.name}" if path else node.name


class _Names:
    def __init__(self):
        self.used: set = set()

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def _ref_of(program) -> dict:
    """fx node name of the translated program -> reference node name."""
    return {n.name: meta.custom_get(n, REF) for n in program.exported_program.graph.nodes}


def finish(program, ref: fx.GraphModule, prep: Prepared, flat: list) -> Emitted:
    model: ir.Model = program.model
    graph = model.graph
    global_average_pool(graph)
    refs = {n.name: n for n in ref.graph.nodes}
    to_ref = _ref_of(program)
    owner = {}
    for node in graph:
        m = _FX.match(node.metadata_props.get("pkg.torch.onnx.fx_node", ""))
        r = to_ref.get(m.group(1)) if m else None
        if r in refs:
            owner[node] = refs[r]
    _rename_initializers(graph, prep, owner)
    storage = dict(prep.storage)
    weights = _weight_dqs(graph, owner, storage)
    names = _Names()
    for v in graph.initializers.values():
        names.used.add(v.name)
    for v in graph.inputs:
        names.used.add(v.name)
    _rename_nodes(graph, owner, names, weights)
    dynamic = _name_batch(graph)
    opset = model.opset_imports.get("", 18)
    proto = ir.serde.serialize_model(model)
    out = Emitted(proto, opset, dynamic, *_io(program, graph, flat), storage=storage,
                  kernel_notes=dict(prep.kernel_notes), notes=list(prep.notes))
    for node in graph:
        if node in owner:
            out.node_of[node.name] = owner[node].name
            out.onnx_of.setdefault(owner[node].name, []).append(node.name)
    out.weights = {n.name: owner[n].name for n in weights if n in owner}
    out.quantized = _quantized(graph, owner)
    return out


def _rename_initializers(graph: ir.Graph, prep: Prepared, owner: dict) -> None:
    """Initializers of constants ``prepare`` made get their recorded names."""
    for value in list(graph.initializers.values()):
        want = prep.names.get(value.name)
        if want and want not in graph.initializers:
            value.name = want


def _weight_dqs(graph: ir.Graph, owner: dict, storage: dict) -> list:
    """Weight / int32-bias DequantizeLinear nodes of the reference's weight DQs: name their initializers
    after the layer, tag them for the storage report. Returns those DQ nodes (named ``<init>:dq`` later)."""
    found = []
    for node in graph:
        src = node.inputs[0] if node.op_type == "DequantizeLinear" and node.inputs else None
        if src is None or not src.is_initializer():
            continue
        found.append(node)
        dq = owner.get(node)
        if dq is None or dq.target not in _W_DQ or not dq.users:
            _name_params(graph, node)  # a DQ ``prepare`` made: its codes are named already
            continue
        user = next(iter(dq.users))
        role = "bias" if len(user.args) > 2 and user.args[2] is dq else "weight"
        path = module_path(user) or user.name
        base = f"{path}.{role}"
        for value, suffix in zip(node.inputs, ("", ":scale", ":zero_point")):
            if value is not None and value.is_initializer() and not _named(value) and f"{base}{suffix}" not in graph.initializers:
                value.name = f"{base}{suffix}"
        tags = [("bias", src.const_value.size if src.const_value is not None else 0)] if role == "bias" else [
            ("codes", src.const_value.size if src.const_value is not None else 0), ("scales", 0), ("zero_points", 0)]
        for value, (tag, n) in zip(node.inputs, tags):
            if value is not None and value.is_initializer():
                storage.setdefault(value.name, (user.name, tag, int(n) if tag == "codes" else 0))
    return found


def _name_params(graph: ir.Graph, node: ir.Node) -> None:
    src = node.inputs[0]
    if not _named(src):
        return
    for value, suffix in zip(node.inputs[1:], (":scale", ":zero_point")):
        if value is not None and value.is_initializer() and not _named(value) and f"{src.name}{suffix}" not in graph.initializers:
            value.name = f"{src.name}{suffix}"


def _named(value: ir.Value) -> bool:
    """An initializer already named after a layer (shared scales keep their first name)."""
    return "." in value.name or ":" in value.name


def _rename_nodes(graph: ir.Graph, owner: dict, names: _Names, weight_dqs: list) -> None:
    weight_dqs = set(weight_dqs)
    last = {}
    for node in graph:
        if node in owner:
            last[owner[node].name] = node
    for node in graph:
        r = owner.get(node)
        if node in weight_dqs:
            node.name = names.unique(f"{node.inputs[0].name}:dq")
        elif r is not None and r.target == qd.quantize_per_tensor.default and node.op_type == "QuantizeLinear":
            node.name = names.unique(f"{_base(r.args[0])}:q")
            for value, suffix in zip(node.inputs[1:], (":scale", ":zero_point")):
                if value is not None and value.is_initializer() and not _named(value):
                    value.name = f"{node.name[:-2]}{suffix}"
        elif r is not None and r.target == qd.dequantize_per_tensor.default and node.op_type == "DequantizeLinear":
            src = r.args[0]
            src = src.args[0] if isinstance(src, fx.Node) and src.target == qd.quantize_per_tensor.default else src
            node.name = names.unique(f"{_base(src)}:dq")
        elif r is not None:
            base = _base(r)
            node.name = names.unique(base if last[r.name] is node else f"{base}/{node.op_type}")
        else:
            node.name = names.unique(node.name or node.op_type)
    _name_values(graph)


def _name_values(graph: ir.Graph) -> None:
    """Node outputs are named after their node (``<node>`` or ``<node>:<i>``); graph inputs, outputs and
    initializers keep their names."""
    values = _Names()
    values.used.update(v.name for v in list(graph.inputs) + list(graph.outputs) + list(graph.initializers.values()))
    outs = [(node, i, o) for node in graph for i, o in enumerate(node.outputs)
            if not o.is_graph_output() and not o.is_initializer()]
    for k, (_, _, o) in enumerate(outs):  # first out of the way: a wanted name may be some other value's now
        o.name = f"__qcompile_tmp_{k}"
    for node, i, o in outs:
        o.name = values.unique(node.name if len(node.outputs) == 1 else f"{node.name}:{i}")


def _name_batch(graph: ir.Graph) -> bool:
    """Call the symbolic dimension 0 of the inputs ``batch`` everywhere; True if there is one."""
    syms = {str(v.shape[0]) for v in graph.inputs
            if v.shape is not None and len(v.shape) and isinstance(v.shape[0], ir.SymbolicDim) and v.shape[0].value}
    if not syms:
        return False
    values = list(graph.inputs) + list(graph.outputs) + [o for n in graph for o in n.outputs]
    for v in values:
        if v.shape is not None and any(isinstance(d, ir.SymbolicDim) and str(d) in syms for d in v.shape):
            v.shape = ir.Shape(["batch" if isinstance(d, ir.SymbolicDim) and str(d) in syms else d for d in v.shape])
    return True


def _io(program, graph: ir.Graph, flat: list) -> tuple[list, list, list]:
    """(input names per flat input, output names per output leaf, output template)."""
    onnx_in = iter(v.name for v in graph.inputs)
    inputs = [next(onnx_in, None) if isinstance(a, torch.Tensor) else None for a in flat]
    from torch.export.graph_signature import OutputKind, TensorArgument
    onnx_out = iter(v.name for v in graph.outputs)
    outputs, template = [], []
    for spec in program.exported_program.graph_signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            continue
        if isinstance(spec.arg, TensorArgument):
            outputs.append(next(onnx_out))
            template.append(None)
        else:
            outputs.append(None)
            template.append(getattr(spec.arg, "value", None))
    return inputs, outputs, template


def _quantized(graph: ir.Graph, owner: dict) -> list:
    out = []
    for node in graph:
        r = owner.get(node)
        if node.op_type != "QuantizeLinear" or r is None or r.target != qd.quantize_per_tensor.default:
            continue
        x = r.args[0]
        out.append(QInfo(r.name, node.outputs[0].name, x.name, module_path(x), float(r.args[1]), int(r.args[2]),
                         r.args[5]))
    return out
