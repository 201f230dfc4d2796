"""Compatibility names: the pattern language and rules are :mod:`qcompile.passes.rewrite` (the one rewrite
engine); op kinds are the core vocabulary :mod:`qcompile.ops`."""
from qcompile.ops import OPS, op_kind  # noqa: F401

from .rewrite import Element, Match, Rule, RuleSet, match_chain  # noqa: F401
