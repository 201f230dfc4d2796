"""Fusion: mark groups of nodes the backend runs as one kernel (conv+relu, add+relu...).

The pass only records :class:`~qcompile.annotation.FusionGroup` metadata; the reference graph keeps
every op, with no quantize/dequantize inside a group, and lowering turns the group into one kernel.
"""
from __future__ import annotations

from torch import fx

from qcompile import meta
from qcompile.annotation import FusionGroup, get_group, set_group

from .infra import Pass, PassResult
from .rewrite import RuleSet, run

REJECTIONS = meta.REJECTIONS.name  # the key's string, for passes.annotate (reads node.meta[REJECTIONS])


class FuseGroups(Pass):
    def __init__(self, rules: RuleSet):
        self.rules = rules

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        skip = lambda n: n.op != "call_function" or get_group(n) is not None  # noqa: E731
        for step in run(gm.graph.nodes, self.rules, gm, skip):
            if step.reasons:
                meta.REJECTIONS.set(step.node, list(step.reasons))
            if step.match is None or any(get_group(n) is not None for n in step.match):
                continue
            group = FusionGroup(step.node.name, step.match.rule.name, tuple(n.name for n in step.match))
            for n in step.match:
                set_group(n, group)
            modified = True
        return PassResult(gm, modified)
