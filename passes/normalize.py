"""Canonicalize the captured graph into the one form every backend's rules are written against.

* every in-place ATen op ``foo_`` with a functional sibling ``foo`` (same overload, same arguments)
  becomes ``foo``, and later readers of the mutated tensor read the result (generic: read from the
  op schemas, not a table; ``silu_``, ``dropout_``, ``leaky_relu_``, ``sigmoid_``... all follow);
* ``relu6`` -> ``hardtanh(0, 6)``;
* eval-mode dropout (all its variants), ``alias``, ``detach``, ``clone`` and ``contiguous`` are removed;
* ``view`` becomes ``reshape``: with the copies gone (and whatever layout a backend picks, channels-last
  or NHWC), a view of a transposed tensor (ShuffleNet's channel shuffle) must still be computable —
  ``reshape`` is a view where the strides allow it and a copy where they do not, the same values;
* constant-weight ``addmm`` / ``mm`` / ``matmul`` -> ``linear`` (canonical_linear.py);
* ``baddbmm`` -> ``beta * input + alpha * bmm`` (the batched GEMM visible to every backend);
* a zero pad before a conv -> the conv's padding where it is symmetric, a pad of nothing removed (fold_pad.py).

An in-place op on a graph input, a constant or a view of another tensor keeps its mutation (rewriting it
would change what other aliases see); the copies are then kept too.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from qcompile import meta

from .canonical_linear import CanonicalLinear
from .const_fold import fold_constants
from .conv_padding import rewrite_string_padding
from .fold_pad import fold_pads
from .infra import Pass, PassResult

aten = torch.ops.aten
_IDENTITY = {aten.alias.default, aten.detach.default}
_COPIES = {aten.clone.default, aten.contiguous.default}
_DROPOUTS = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"}


def functional_sibling(op) -> object | None:
    """``aten.foo.ovl`` for an in-place ``aten.foo_.ovl`` whose first argument is the written tensor."""
    schema = getattr(op, "_schema", None)
    if schema is None or not schema.name.startswith("aten::") or not schema.name.endswith("_"):
        return None
    args = schema.arguments
    if not args or args[0].alias_info is None or not args[0].alias_info.is_write:
        return None
    base = getattr(aten, schema.name[len("aten::"):-1], None)
    fn = getattr(base, schema.overload_name or "default", None) if base is not None else None
    if fn is None or fn._schema.is_mutable or len(fn._schema.arguments) != len(args):
        return None
    return fn


def _aliases_other_tensors(node: fx.Node) -> bool:
    """Is ``node`` a graph input, a constant, or the output of a view op (aliasing another tensor)?"""
    if node.op in ("placeholder", "get_attr") or node.target is operator.getitem:
        return True  # getitem: a piece of chunk / split / unbind, a view of their input
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None)


def functionalize(gm: fx.GraphModule) -> tuple[bool, bool]:
    """Rewrite in-place ops; returns (modified, every mutation removed)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    modified, complete = False, True
    for node in list(gm.graph.nodes):
        fn = functional_sibling(node.target) if node.op == "call_function" else None
        if fn is None:
            if node.op == "call_function" and getattr(getattr(node.target, "_schema", None), "is_mutable", False):
                complete = False
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or _aliases_other_tensors(src):
            complete = False
            continue
        node.target = fn
        for user in list(src.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(src, node)
        modified = True
    return modified, complete


def _is_eval_dropout(node: fx.Node) -> bool:
    name = getattr(node.target, "_schema", None)
    if name is None or name.name[len("aten::"):] not in _DROPOUTS:
        return False
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return not train


def _removable(node: fx.Node, copies_ok: bool) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    return node.target in _IDENTITY or (copies_ok and node.target in _COPIES) or _is_eval_dropout(node)


def split_baddbmm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``baddbmm(input, b1, b2, beta, alpha)`` -> ``beta * input + alpha * bmm(b1, b2)`` (BLOOM's ALiBi
    attention scores): the batched GEMM becomes a ``bmm`` every backend knows (ONNX Runtime runs it as an
    int8 QLinearMatMul), reported with its MACs, not hidden in an op no backend quantizes."""
    if node.target != aten.baddbmm.default or len(node.args) < 3:
        return False
    inp, b1, b2 = node.args[:3]
    beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
    alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
    keep = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
    with gm.graph.inserting_before(node):
        prod = gm.graph.call_function(aten.bmm.default, (b1, b2))
        scaled = prod if alpha == 1 else gm.graph.call_function(aten.mul.Tensor, (prod, alpha))
        base = inp if beta == 1 else gm.graph.call_function(aten.mul.Tensor, (inp, beta))
        out = gm.graph.call_function(aten.add.Tensor, (base, scaled))
    for new in {prod, scaled, base, out} - {inp}:
        new.meta.update(keep)
    if "val" in node.meta:  # bmm(b1, b2) has the shape and dtype of the result; ``input`` broadcasts to it
        for new in {prod, scaled, out}:
            new.meta["val"] = node.meta["val"]
        if base is not inp and "val" in getattr(inp, "meta", {}):
            base.meta["val"] = inp.meta["val"]
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return True


class Normalize(Pass):
    """Rewrite the graph into the canonical form rules are written against."""
    requires, ensures = frozenset({"captured"}), frozenset({"normalized"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified, no_mutation = functionalize(gm)
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target == aten.relu6.default:
                node.target, node.args = aten.hardtanh.default, (node.args[0], 0.0, 6.0)
                modified = True
            elif node.target == aten.baddbmm.default:
                modified |= split_baddbmm(gm, node)
            elif node.target == aten.view.default and no_mutation:
                node.target = aten.reshape.default
                modified = True
            elif _removable(node, no_mutation):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                modified = True
        if not meta.TRAIN.get(gm, False):  # QAT trains the parameters: nothing is constant
            modified |= fold_constants(gm)
        modified |= CanonicalLinear()(gm).modified
        modified |= rewrite_string_padding(gm)
        modified |= fold_pads(gm)  # TF-style explicit zero padding -> the conv's own padding (fold_pad.py)
        if modified:
            gm.recompile()
        return PassResult(gm, modified)
