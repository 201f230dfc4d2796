"""The one rewrite engine: patterns, rules as values, and the one match-and-rewrite loop.

Every graph rewrite in qcompile is written the same way — batch-norm and hardsigmoid folding, the QAT
conv-BN collapse, fusion, and both x86 lowerings (static groups, float-mode kernels)::

    # conv -> batch_norm  ->  conv (folded weight, bias)
    Rule("conv2d_bn", ("conv2d", "batch_norm"), check=_constant_stats, rewrite=_fold, names=("conv", "bn"))

* **pattern**: a chain of elements, producer first; each inner node must have a single user. An element
  is an op kind (``"conv2d"``, see :mod:`qcompile.ops`), a tuple of alternative kinds, or a predicate
  ``fn(node) -> bool`` for what op kinds cannot say (``linear`` whose input is a dynamic quantize chain).
  ``names`` names the chain's positions: ``m["bn"]`` is the matched batch-norm (named captures).
* **check(match) -> None | reason**: a constraint beyond the pattern's shape. A reason is recorded
  (``"rule: reason"``) and the next rule is tried at the same anchor (conv2d_relu rejected -> conv2d).
* **rewrite(match) -> result | reason | None**: does the work. A returned string means the rule
  declined once it looked closer (a lowering that finds its input not quantized): the reason is final
  for that anchor. None means it left the node alone and has nothing to report; the next rule is tried.
* **benefit**: the largest pattern wins by default (conv2d_bn_relu beats conv2d_bn beats conv2d).

Matching never mutates the graph. Rules live in explicit :class:`RuleSet` values owned by their user
(``FoldBatchNorm(RULES)``, the x86 backend's ``RULES``); nothing is registered by importing a module.
:func:`run` is the loop; :func:`rewritten` / :func:`rewrite_graph` run it in place over a graph module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from torch import fx

from qcompile.ops import op_kind

Element = Any  # an op kind (str), alternatives (tuple of str), or a predicate fn(node) -> bool


def _accepts(elem: Element, node: fx.Node) -> bool:
    if callable(elem):
        return bool(elem(node))
    kind = op_kind(node)
    if kind is None:
        return False
    return kind == elem if isinstance(elem, str) else kind in elem


def match_chain(anchor: fx.Node, pattern: Sequence[Element]) -> list[fx.Node] | None:
    """Nodes matching ``pattern`` starting at ``anchor``; each inner node must have a single user."""
    if not _accepts(pattern[0], anchor):
        return None
    nodes = [anchor]
    for elem in pattern[1:]:
        users = list(nodes[-1].users)
        if len(users) != 1 or not _accepts(elem, users[0]):
            return None
        nodes.append(users[0])
    return nodes


@dataclass(frozen=True)
class Match:
    """The nodes a rule's pattern matched (producer first) and the context the rule runs in (the graph
    module, a lowerer...). A match reads like the list of its nodes: ``conv, bn = match``, ``match[0]``;
    a string index reads a named capture: ``match["bn"]``."""

    rule: "Rule"
    nodes: tuple
    ctx: Any = None

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.nodes[self.rule.names.index(key)]
        return self.nodes[key]

    def __iter__(self):
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def anchor(self) -> fx.Node:
        return self.nodes[0]

    @property
    def user(self) -> fx.Node | None:
        """The single user of the last matched node, or None."""
        users = list(self.nodes[-1].users)
        return users[0] if len(users) == 1 else None


@dataclass(frozen=True)
class Rule:
    """pattern + check + rewrite + name + benefit (module docstring)."""

    name: str
    pattern: tuple
    check: Callable[[Match], str | None] | None = None
    benefit: int | None = None
    rewrite: Callable[[Match], Any] | None = None
    names: tuple = ()

    @property
    def score(self) -> int:
        return self.benefit if self.benefit is not None else len(self.pattern)

    def match(self, anchor: fx.Node, ctx=None) -> tuple[Match | None, str | None]:
        """(match, None) when pattern and check pass, (None, reason) when the check fails, else (None, None)."""
        nodes = match_chain(anchor, self.pattern)
        if nodes is None:
            return None, None
        m = Match(self, tuple(nodes), ctx)
        reason = self.check(m) if self.check else None
        return (None, reason) if reason else (m, None)


class RuleSet:
    """An ordered set of rules; the highest benefit wins, ties keep declaration order."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = sorted(list(rules), key=lambda r: -r.score)
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate rule names in RuleSet: {names}")

    def __add__(self, other: "RuleSet | Iterable[Rule]") -> "RuleSet":
        return RuleSet(self.rules + list(other))

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def by_name(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)

    def get(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    def match(self, anchor: fx.Node, ctx=None) -> tuple[Rule | None, Match | None, list[str]]:
        """Best rule matching at ``anchor`` and the reasons the rules whose pattern matched rejected it."""
        reasons = []
        for rule in self.rules:
            m, reason = rule.match(anchor, ctx)
            if m is not None:
                return rule, m, reasons
            if reason:
                reasons.append(f"{rule.name}: {reason}")
        return None, None, reasons


@dataclass(frozen=True)
class Step:
    """What the loop did at one node: the match it applied (None: no rule), the rewrite's result, and the
    reasons of the rules whose pattern matched but whose check failed."""

    node: fx.Node
    match: Match | None = None
    result: Any = None
    reasons: tuple = field(default_factory=tuple)

    @property
    def reason(self) -> str | None:
        """The rewrite's reason when it declined."""
        return self.result if isinstance(self.result, str) else None

    @property
    def applied(self) -> bool:
        return self.match is not None and self.result is not None and not isinstance(self.result, str)


def _apply(rules: RuleSet, node: fx.Node, ctx) -> Step:
    reasons: list[str] = []
    for rule in rules:
        m, reason = rule.match(node, ctx)
        if reason:
            reasons.append(f"{rule.name}: {reason}")
        if m is None:
            continue
        result = rule.rewrite(m) if rule.rewrite is not None else m
        if result is not None:
            return Step(node, m, result, tuple(reasons))
    return Step(node, None, None, tuple(reasons))


def run(nodes: Iterable[fx.Node], rules: RuleSet, ctx=None, skip: Callable[[fx.Node], bool] | None = None
        ) -> Iterator[Step]:
    """The match-and-rewrite loop: for each node (a snapshot of ``nodes``, ``skip`` asked lazily, so a
    rewrite may claim later nodes), try the rules best first and yield the :class:`Step`. A rule without
    ``rewrite`` yields its match as the result (fusion only records groups)."""
    for node in list(nodes):
        if skip is not None and skip(node):
            continue
        yield _apply(rules, node, ctx)


def rewritten(gm: fx.GraphModule, rules: RuleSet, ctx=None) -> list[str]:
    """Run ``rules`` over ``gm``'s call_function nodes in place (``ctx`` defaults to ``gm``); returns the
    names of the nodes a rule rewrote, in graph order."""
    steps = run(gm.graph.nodes, rules, gm if ctx is None else ctx,
                skip=lambda n: n.op != "call_function" or getattr(n, "_erased", False))
    return [s.node.name for s in steps if s.applied]


def rewrite_graph(gm: fx.GraphModule, rules: RuleSet, ctx=None) -> int:
    """:func:`rewritten` for passes that only need to know how many rewrites applied."""
    return len(rewritten(gm, rules, ctx))
