"""Fold computations on constants into constants: a weight computed from parameters is a weight.

``nn.utils.weight_norm`` / ``parametrizations.weight_norm`` (wav2vec2's positional conv), a transposed or
reshaped parameter, a scale computed from two buffers: captured, each is a chain of ops whose inputs are all
parameters or buffers, evaluated on every call, and the conv or linear that reads it sees "weight is not a
constant" and stays float. This pass evaluates such chains once (in eval mode the parameters are fixed)
and replaces them by a constant, so the layer quantizes like any other.

Folded: ``call_function`` ATen ops whose tensor inputs are all constants (``get_attr``), that are neither
random nor in-place, when the result is not much larger than the inputs (a broadcast of a small buffer to
activation size stays an op); a split / chunk of constants is folded piece by piece (its ``getitem`` users).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from qcompile.ir import add_constant, erase_dead_params, get_attr_value

MAX_GROWTH = 4  # result elements <= 4x the folded inputs' elements (plus a small allowance)


def _foldable(gm: fx.GraphModule, node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags or target._schema.is_mutable:
        return False
    inputs = node.all_input_nodes
    if not inputs or any(n.op != "get_attr" for n in inputs):
        return False
    return all(isinstance(get_attr_value(gm, n), torch.Tensor) for n in inputs)


def _fold_pieces(gm: fx.GraphModule, node: fx.Node, value, inputs: dict) -> bool:
    """A split / chunk / unbind of constants (``torch.cat((q.bias, k.bias, v.bias)).chunk(3)`` in
    ``F.multi_head_attention_forward``): every ``getitem`` of it becomes a constant. Only when every user is
    a ``getitem`` and the pieces are tensors no larger in total than the inputs allow."""
    users = list(node.users)
    if not users or not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                            for u in users):
        return False
    if not all(isinstance(v, torch.Tensor) for v in value):
        return False
    if sum(v.numel() for v in value) > MAX_GROWTH * sum(t.numel() for t in inputs.values()) + 64:
        return False
    for item in users:
        const = add_constant(gm, f"{item.name}_folded", value[item.args[1]].contiguous(), item)
        const.meta.update({k: v for k, v in item.meta.items() if k in ("val", "tensor_meta", "nn_module_stack",
                                                                         "stack_trace", "source_fn_stack")})
        item.replace_all_uses_with(const)
        gm.graph.erase_node(item)
    gm.graph.erase_node(node)
    return True


def fold_constants(gm: fx.GraphModule) -> bool:
    """Replace every foldable op (see module doc) by its value; True if the graph changed."""
    modified = False
    for node in list(gm.graph.nodes):
        if not _foldable(gm, node):
            continue
        inputs = {n: get_attr_value(gm, n) for n in node.all_input_nodes}
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: inputs[n])
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        if isinstance(value, (list, tuple)):
            modified |= _fold_pieces(gm, node, value, inputs)
            continue
        if not isinstance(value, torch.Tensor):
            continue
        if value.numel() > MAX_GROWTH * sum(t.numel() for t in inputs.values()) + 64:
            continue
        const = add_constant(gm, f"{node.name}_folded", value.contiguous(), node)
        const.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack",
                                                                         "stack_trace", "source_fn_stack")})
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
        modified = True
    if modified:
        erase_dead_params(gm)
    return modified
