"""Fusion: mark groups of nodes the backend runs as one kernel (conv+relu, add+relu...).

The pass only records :class:`~qcompile.annotation.FusionGroup` metadata; the reference graph keeps
every op, with no quantize/dequantize inside a group, and lowering turns the group into one kernel.
"""
from __future__ import annotations

from torch import fx

from qcompile.annotation import FusionGroup, get_group, set_group

from .infra import Pass, PassResult
from .pattern import RuleSet

REJECTIONS = "qcompile_rejections"


class FuseGroups(Pass):
    def __init__(self, rules: RuleSet):
        self.rules = rules

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            if node.op != "call_function" or get_group(node) is not None:
                continue
            rule, nodes, reasons = self.rules.match(node)
            if reasons:
                node.meta[REJECTIONS] = reasons
            if rule is None or any(get_group(n) is not None for n in nodes):
                continue
            group = FusionGroup(node.name, rule.name, tuple(n.name for n in nodes))
            for n in nodes:
                set_group(n, group)
            modified = True
        return PassResult(gm, modified)
