"""A small declarative pattern language over captured ATen graphs.

An *op kind* names a set of ATen overloads (``"conv2d"``, ``"relu"``...). A *pattern* is a chain of
op kinds, producer first: ``("conv2d", ("relu", "relu6"))`` matches a conv2d whose only user is a
ReLU or a ReLU6. A :class:`Rule` is pattern + check + name + benefit (default: the pattern length,
so the largest pattern wins). Matching never mutates the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import fx

aten = torch.ops.aten

OPS: dict[str, tuple] = {
    "conv1d": (aten.conv1d.default,),
    "conv2d": (aten.conv2d.default,),
    "conv_transpose2d": (aten.conv_transpose2d.input,),
    "linear": (aten.linear.default,),
    "matmul": (aten.matmul.default, aten.bmm.default),
    "relu": (aten.relu.default, aten.relu_.default),
    "hardtanh": (aten.hardtanh.default, aten.hardtanh_.default),
    "add": (aten.add.Tensor, aten.add_.Tensor),
    "mul": (aten.mul.Tensor, aten.mul_.Tensor),
    "cat": (aten.cat.default,),
    "max_pool2d": (aten.max_pool2d.default,),
    "avg_pool2d": (aten.avg_pool2d.default,),
    "adaptive_avg_pool2d": (aten.adaptive_avg_pool2d.default,),
    "mean": (aten.mean.dim,),
    "flatten": (aten.flatten.using_ints,),
    "reshape": (aten.view.default, aten.reshape.default, aten._unsafe_view.default),
    "permute": (aten.permute.default, aten.transpose.int),
    "unflatten": (aten.unflatten.int,),
    "unsqueeze": (aten.unsqueeze.default,),
    "squeeze": (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default),
    "select": (aten.select.int,),
    "hardswish": (aten.hardswish.default, aten.hardswish_.default),
    "hardsigmoid": (aten.hardsigmoid.default, aten.hardsigmoid_.default),
    "sigmoid": (aten.sigmoid.default,),
    "softmax": (aten.softmax.int, aten._softmax.default),
    "layer_norm": (aten.layer_norm.default,),
    "gelu": (aten.gelu.default,),
    "batch_norm": (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default),
    "dropout": (aten.dropout.default,),
    "embedding": (aten.embedding.default,),
}
_KIND = {op: kind for kind, ops in OPS.items() for op in ops}


_OWN_NAMESPACES = ("aten", "prims", "quantized_decomposed", "quantized", "qcompile")


def op_kind(node: fx.Node) -> str | None:
    """The op kind of a node; ``relu6`` for hardtanh(0, 6); a user's custom op (``torch.library``) is its
    own kind, named ``"namespace::name"`` (so support rows and lowering rules can name it)."""
    if node.op != "call_function":
        return None
    kind = _KIND.get(node.target)
    if kind is None and isinstance(node.target, torch._ops.OpOverload) and node.target.namespace not in _OWN_NAMESPACES:
        return node.target._schema.name
    if kind == "hardtanh" and tuple(node.args[1:3]) == (0.0, 6.0):
        return "relu6"
    return kind


Element = str | tuple  # one op kind or alternatives


def _accepts(elem: Element, kind: str | None) -> bool:
    if kind is None:
        return False
    return kind == elem if isinstance(elem, str) else kind in elem


def match_chain(anchor: fx.Node, pattern: Sequence[Element]) -> list[fx.Node] | None:
    """Nodes matching ``pattern`` starting at ``anchor``; each inner node must have a single user."""
    if not _accepts(pattern[0], op_kind(anchor)):
        return None
    nodes = [anchor]
    for elem in pattern[1:]:
        users = list(nodes[-1].users)
        if len(users) != 1 or not _accepts(elem, op_kind(users[0])):
            return None
        nodes.append(users[0])
    return nodes


@dataclass(frozen=True)
class Rule:
    """pattern + check + name + benefit. ``check(nodes)`` returns a reason string when it fails."""

    name: str
    pattern: tuple
    check: Callable[[list[fx.Node]], str | None] | None = None
    benefit: int | None = None

    @property
    def score(self) -> int:
        return self.benefit if self.benefit is not None else len(self.pattern)

    def match(self, anchor: fx.Node) -> tuple[list[fx.Node] | None, str | None]:
        nodes = match_chain(anchor, self.pattern)
        if nodes is None:
            return None, None
        reason = self.check(nodes) if self.check else None
        return (None, reason) if reason else (nodes, None)


class RuleSet:
    """An ordered set of rules; the highest benefit wins, ties keep declaration order."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = sorted(list(rules), key=lambda r: -r.score)
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate rule names in RuleSet: {names}")

    def __add__(self, other: "RuleSet") -> "RuleSet":
        return RuleSet(self.rules + other.rules)

    def __iter__(self):
        return iter(self.rules)

    def by_name(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)

    def match(self, anchor: fx.Node) -> tuple[Rule | None, list[fx.Node] | None, list[str]]:
        """Best rule matching at ``anchor`` and the reasons the rules whose pattern matched rejected it."""
        reasons = []
        for rule in self.rules:
            nodes, reason = rule.match(anchor)
            if nodes is not None:
                return rule, nodes, reasons
            if reason:
                reasons.append(f"{rule.name}: {reason}")
        return None, None, reasons
