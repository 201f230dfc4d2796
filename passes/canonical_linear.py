"""``addmm`` / ``mm`` / ``matmul`` with a constant weight -> ``linear``: one form every backend quantizes.

Hugging Face GPT-2's ``Conv1D`` computes ``addmm(bias, x.view(-1, nx), weight)`` with a weight stored
``[in, out]``; other models write ``x @ self.weight`` or ``torch.mm(x, W)``. They are linear layers:
rewritten as ``linear(x, W.T, bias)`` (the transposed weight stored once per parameter), they get the
per-channel int8 kernels, the bias handling and the report rows of ``nn.Linear``. Only exact rewrites
are made: a 2-D constant right operand (a parameter / buffer, or its ``.t()`` / ``transpose(0, 1)``),
``addmm`` with ``beta == alpha == 1`` and a 1-D bias of the output width.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile.ir import add_constant, erase_dead_params, get_attr_value

from .infra import Pass, PassResult

aten = torch.ops.aten
_TRANSPOSES = (aten.t.default, aten.transpose.int, aten.permute.default)


def _constant_weight(gm: fx.GraphModule, node) -> tuple[fx.Node, bool] | None:
    """(get_attr node, already transposed?) when ``node`` is a constant 2-D matrix or its transpose."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = get_attr_value(gm, node)
        return (node, False) if isinstance(value, torch.Tensor) and value.dim() == 2 else None
    if node.op == "call_function" and node.target in _TRANSPOSES and isinstance(node.args[0], fx.Node):
        if node.target == aten.transpose.int:
            swap = node.args[1] % 2 != node.args[2] % 2
        elif node.target == aten.permute.default:
            swap = [d % 2 for d in node.args[1]] == [1, 0]
        else:
            swap = True
        inner = _constant_weight(gm, node.args[0])
        return (inner[0], inner[1] != swap) if inner is not None else None
    return None


def _linear_args(gm: fx.GraphModule, node: fx.Node):
    """(x, weight source, transposed?, bias) if ``node`` is a linear layer in disguise, else None."""
    if node.target == aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) > 3:
            return None
        bias, x, w = node.args[:3]
        found = _constant_weight(gm, w)
        if found is None or not _bias_fits(gm, bias, found):
            return None
        return x, found[0], found[1], bias
    if node.target in (aten.mm.default, aten.matmul.default) and not node.kwargs:
        x, w = node.args[:2]
        x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
        found = _constant_weight(gm, w)
        if found is None or x_val is None or x_val.dim() < 2:
            return None  # a 1-D left operand of matmul is a vector product, not a batched linear layer
        return x, found[0], found[1], None
    return None


def _bias_fits(gm, bias, found) -> bool:
    if not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return False
    b, w = get_attr_value(gm, bias), get_attr_value(gm, found[0])
    out = w.shape[0] if found[1] else w.shape[1]
    return b.dim() == 1 and b.shape[0] == out


class CanonicalLinear(Pass):
    """Rewrite constant-weight ``addmm`` / ``mm`` / ``matmul`` as ``aten.linear`` (exact in float)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        transposed: dict[str, fx.Node] = {}  # weight parameter -> its [out, in] copy (shared weights)
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            found = _linear_args(gm, node)
            if found is None:
                continue
            x, src, is_t, bias = found
            weight = src if is_t else transposed.get(src.target)
            if weight is None:  # first use of this parameter in graph order: the copy dominates later ones
                value = get_attr_value(gm, src).t().contiguous()
                weight = transposed[src.target] = add_constant(gm, f"{src.target}_t", value, node)
            with gm.graph.inserting_before(node):
                lin = gm.graph.call_function(aten.linear.default, (x, weight) + ((bias,) if bias is not None else ()))
            lin.meta = dict(node.meta)
            node.replace_all_uses_with(lin)
            gm.graph.erase_node(node)
            modified = True
        if modified:
            erase_dead_params(gm)
            gm.recompile()
        return PassResult(gm, modified)
