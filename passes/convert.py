"""Convert an observed (or fake-quantized) graph into the quantize/dequantize reference graph.

Activation observers become ``quantize_per_tensor -> dequantize_per_tensor`` pairs with the
calibrated parameters as literals; weights become integer constants followed by a dequantize
(per-tensor, per-channel or per-group). Every backend lowers from this graph.
Dynamic activations and NF4 weights use the vocabulary of ``qcompile.passes.dynamic``.
"""
from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers quantized_decomposed ops
from torch import fx

from qcompile import meta
from qcompile import annotation as A
from qcompile.ir import add_constant, copy_meta, erase_dead_params, get_attr_value
from qcompile.observers import weight_qparams  # noqa: F401  (also re-exported: older callers import it here)
from qcompile.qparams import quantize
from qcompile.specs import FixedSpec, NF4Spec, QParams, QuantSpec

from .dynamic import insert_dynamic_qdq, insert_nf4_weight, quantize_recurrent_weights
from .infra import Pass, PassResult

qd = torch.ops.quantized_decomposed


def insert_qdq(gm: fx.GraphModule, value: fx.Node, qp: QParams, users=None) -> fx.Node:
    """Insert q -> dq after ``value`` (per-tensor); rewire ``users`` (default: all) to the dq node."""
    args = (float(qp.scale.item()), int(qp.zero_point.item()), qp.quant_min, qp.quant_max, qp.dtype)
    with gm.graph.inserting_after(value):
        q = gm.graph.call_function(qd.quantize_per_tensor.default, (value, *args))
    with gm.graph.inserting_after(q):
        dq = gm.graph.call_function(qd.dequantize_per_tensor.default, (q, *args))
    for n in (q, dq):
        copy_meta(value, n)
    meta.QPARAMS.set(q, qp)
    targets = list(users) if users is not None else [u for u in value.users if u is not q]
    for u in targets:
        u.replace_input_with(value, dq)
    return dq


def quantize_weight(gm: fx.GraphModule, node: fx.Node, index: int, spec: QuantSpec) -> None:
    """Replace ``node.args[index]`` (a constant) by int constant -> dequantize."""
    w_node = node.args[index]
    w = get_attr_value(gm, w_node).detach().float()
    qp = meta.WEIGHT_QPARAMS.get(w_node) or weight_qparams(w, spec)
    q = add_constant(gm, f"{node.name}_weight_int", quantize(w, qp), node)
    if qp.per_tensor:
        args = (q, float(qp.scale.item()), int(qp.zero_point.item()), qp.quant_min, qp.quant_max, qp.dtype)
        target = qd.dequantize_per_tensor.default
    elif qp.group_size is None:
        s = add_constant(gm, f"{node.name}_weight_scale", qp.scale.float(), node)
        z = add_constant(gm, f"{node.name}_weight_zp", qp.zero_point.to(torch.int64), node)
        args = (q, s, z, qp.axis % w.dim(), qp.quant_min, qp.quant_max, qp.dtype)
        target = qd.dequantize_per_channel.default
    else:
        s = add_constant(gm, f"{node.name}_weight_scale", qp.scale.float(), node)
        z = add_constant(gm, f"{node.name}_weight_zp", qp.zero_point.to(torch.int64), node)
        args = (q, s, z, qp.quant_min, qp.quant_max, qp.dtype, qp.group_size, torch.float32)
        target = qd.dequantize_per_channel_group.default
    with gm.graph.inserting_before(node):
        dq = gm.graph.call_function(target, args)
    meta.QPARAMS.set(dq, qp)
    copy_meta(w_node, dq, keys=("val",))
    node.update_arg(index, dq)


class ConvertToReference(Pass):
    requires, ensures = frozenset({"annotated"}), frozenset({"reference"})
    def call(self, gm: fx.GraphModule) -> PassResult:
        observed = meta.OBSERVED.get(gm, {})
        qps = {name: gm.get_submodule(name).calculate_qparams() for name in observed}
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and node.target in qps:
                src, users = node.args[0], list(node.users)
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                insert_qdq(gm, src, qps[node.target], users=users)
        dynamic_chains: dict = {}
        for node in list(gm.graph.nodes):
            ann = A.get_annotation(node)
            if ann is None:
                continue
            if isinstance(ann.output_spec, FixedSpec):
                fs = ann.output_spec
                insert_qdq(gm, node, QParams(torch.tensor(fs.scale), torch.tensor(fs.zero_point),
                                             fs.quant_min, fs.quant_max, fs.dtype))
            for i, spec in ann.input_specs.items():
                arg = node.args[i] if i < len(node.args) else None
                if not isinstance(arg, fx.Node):
                    continue
                if isinstance(spec, QuantSpec) and spec.dynamic:  # dynamic mode: parameters chosen at run time
                    insert_dynamic_qdq(gm, node, i, spec, dynamic_chains)
                elif isinstance(spec, QuantSpec) and arg.op == "get_attr":
                    quantize_weight(gm, node, i, spec)
                elif isinstance(spec, NF4Spec) and arg.op == "get_attr":
                    insert_nf4_weight(gm, node, i, spec, meta.WEIGHT_QPARAMS.get(arg))
            if meta.RNN_WEIGHT_SPEC.has(node):  # LSTM / GRU: a list of weight matrices
                quantize_recurrent_weights(gm, node, meta.RNN_WEIGHT_SPEC.get(node))
        for name in observed:
            gm.delete_submodule(name)
        meta.OBSERVED.pop(gm, None)
        erase_dead_params(gm)  # the float weights now read through their integer form
        return PassResult(gm, True)

