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


def _pure_op(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function":
        return False
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return not (torch.Tag.nondeterministic_seeded in target.tags or target._schema.is_mutable)


def fold_constants(gm: fx.GraphModule) -> bool:
    """Replace every value computed from constants alone by a constant (see module doc); True if the
    graph changed.

    The whole constant region is evaluated first, then only the values that leave it (read by an op on
    activations, or returned) become constants, each if it is at most ``MAX_GROWTH`` times the constants
    it was computed from. So a chain that expands and then reduces (Swin V2's continuous position bias: a
    2 -> 512 -> heads MLP over a fixed coordinate table) folds, while a broadcast of a small buffer to
    activation size stays an op. A split of constants folds piece by piece through its ``getitem`` users
    (``torch.cat((q.bias, k.bias, v.bias)).chunk(3)`` in ``F.multi_head_attention_forward``)."""
    values: dict[fx.Node, object] = {}
    leaves: dict[fx.Node, frozenset] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            v = get_attr_value(gm, node)
            if isinstance(v, torch.Tensor):
                values[node], leaves[node] = v, frozenset([node])
            continue
        inputs = node.all_input_nodes
        if not _pure_op(node) or not inputs or any(n not in values for n in inputs):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
        try:
            with torch.no_grad():
                value = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an op that cannot run on the constants stays an op
            continue
        if isinstance(value, torch.Tensor) or (isinstance(value, (list, tuple)) and value
                                               and all(isinstance(v, torch.Tensor) for v in value)):
            values[node] = value
            leaves[node] = frozenset().union(*(leaves[n] for n in inputs))
    modified = False
    # the values read outside the region; one that stays an op (too large, or a tuple) hands the role to its inputs
    todo = [n for n in values if n.op != "get_attr" and any(u not in values for u in n.users)]
    seen = set(todo)
    while todo:
        node = todo.pop()
        value = values[node]
        source = sum(values[leaf].numel() for leaf in leaves[node])
        if not isinstance(value, torch.Tensor) or value.numel() > MAX_GROWTH * source + 64:
            for n in node.all_input_nodes:
                if n.op != "get_attr" and n not in seen:
                    seen.add(n)
                    todo.append(n)
            continue
        const = add_constant(gm, f"{node.name}_folded", value.contiguous(), node)
        const.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack",
                                                                         "stack_trace", "source_fn_stack")})
        node.replace_all_uses_with(const)
        modified = True
    if modified:
        for node in reversed(list(gm.graph.nodes)):  # the constant computations nothing reads any more
            if node in values and node.op == "call_function" and not node.users:
                gm.graph.erase_node(node)
        erase_dead_params(gm)
    return modified
