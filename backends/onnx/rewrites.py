"""onnx-ir rewrites of torch.onnx's output where torch_lib's spelling of an op has no integer kernel in ONNX
Runtime but an equivalent ONNX op does.

* ``ReduceMean(x 4-D, axes={2, 3}, keepdims=1)`` (torch_lib's ``adaptive_avg_pool2d(x, 1)`` and
  ``mean(x, [2, 3], keepdim=True)``) -> ``GlobalAveragePool(x)``: between DequantizeLinear and
  QuantizeLinear ORT runs it as QLinearGlobalAveragePool, ReduceMean stays float.
"""
from __future__ import annotations

import onnx_ir as ir


def _ints(value) -> list | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


def global_average_pool(graph: ir.Graph) -> int:
    """Rewrite in place; returns how many nodes changed."""
    changed = 0
    for node in list(graph):
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
            continue
        x = node.inputs[0]
        rank = len(x.shape) if x.shape is not None else -1
        axes = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
        keep = node.attributes.get("keepdims")
        if rank != 4 or axes is None or sorted(a % 4 for a in axes) != [2, 3] or (keep is not None and keep.value != 1):
            continue
        pool = ir.Node("", "GlobalAveragePool", [x], name=node.name, metadata_props=dict(node.metadata_props))
        graph.insert_before(node, pool)
        pool.outputs[0].shape, pool.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_all_uses_with(node.outputs[0], pool.outputs[0])
        if node.outputs[0].is_graph_output():
            idx = list(graph.outputs).index(node.outputs[0])
            graph.outputs[idx] = pool.outputs[0]
            pool.outputs[0].name = node.outputs[0].name
        graph.remove(node, safe=True)
        changed += 1
    return changed
