"""Canonicalize: in-place ops -> functional, drop eval-mode no-ops (dropout, clone, alias, detach)."""
from __future__ import annotations

import torch
from torch import fx

from .infra import Pass, PassResult

aten = torch.ops.aten
_FUNCTIONAL = {
    aten.relu_.default: aten.relu.default,
    aten.hardtanh_.default: aten.hardtanh.default,
    aten.add_.Tensor: aten.add.Tensor,
    aten.mul_.Tensor: aten.mul.Tensor,
    aten.hardswish_.default: aten.hardswish.default,
    aten.hardsigmoid_.default: aten.hardsigmoid.default,
    aten.relu6.default: None,  # handled below: relu6 -> hardtanh(0, 6)
}
_IDENTITY = {aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default}


def _is_noop(node: fx.Node) -> bool:
    if node.target in _IDENTITY:
        return True
    if node.target == aten.dropout.default:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return not train
    return False


class Normalize(Pass):
    """Rewrite the graph into the canonical form rules are written against."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target == aten.relu6.default:
                node.target, node.args = aten.hardtanh.default, (node.args[0], 0.0, 6.0)
                modified = True
            elif node.target in _FUNCTIONAL and _FUNCTIONAL[node.target] is not None:
                node.target = _FUNCTIONAL[node.target]
                modified = True
            elif _is_noop(node) and isinstance(node.args[0], fx.Node) and not node.kwargs.get("memory_format"):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                modified = True
        return PassResult(gm, modified)
