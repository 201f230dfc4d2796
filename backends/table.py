"""A backend described by data: support table per mode, notes, spec makers. The prepare pipeline is built
here once (x86, ONNX and ExecuTorch used to carry near-identical copies of it).

A subclass states, per mode, which op patterns it runs quantized (:class:`ModeTable`) and how the user's
specs become QuantSpecs (``act_spec`` / ``weight_spec``); it may add passes before fusion or after
annotation (``extra_passes``). Everything else is shared:

    Normalize -> FoldBatchNorm -> [before_fuse] -> FuseGroups(table) -> Annotate(table, specs, notes)
              -> [FloatOutputGroups for dynamic / weight_only] -> [after_annotate]
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qcompile.errors import ConfigError
from qcompile.passes.annotate import Annotate, SpecMaker
from qcompile.passes.dynamic import FloatOutputGroups
from qcompile.passes.fold_batch_norm import FoldBatchNorm
from qcompile.passes.fuse import FuseGroups
from qcompile.passes.normalize import Normalize
from qcompile.passes.pattern import Rule, RuleSet

from .base import Backend

FLOAT_MODES = ("dynamic", "weight_only")  # claimed groups compute and return float (weights quantized)


@dataclass(frozen=True)
class ModeTable:
    """What a backend quantizes in one mode: support rows, the float reasons per op kind, spec makers."""

    rows: list
    notes: dict = field(default_factory=dict)
    specs: SpecMaker | None = None


class TableBackend(Backend):
    """Implement ``support_table()`` (static rows), ``static_notes``, ``act_spec`` / ``weight_spec`` and,
    for dynamic / weight-only modes, ``float_mode_table(mode)``. ``mode_capabilities`` maps mode ->
    Capabilities (``capabilities`` falls back to the "static" entry)."""

    static_notes: dict = {}
    mode_capabilities: dict = {}

    # -- data a subclass gives ----------------------------------------------------------------------
    def support_table(self) -> list:
        """The OpSupport rows run quantized in static / QAT mode."""
        raise NotImplementedError(f"{type(self).__name__}.support_table")

    def float_mode_table(self, mode: str) -> ModeTable | None:
        """The dynamic / weight-only table, or None when the backend has no such mode."""
        return None

    def extra_passes(self, config, mode: str) -> tuple[list, list]:
        """(passes before fusion, passes after annotation) this backend adds in ``mode``."""
        return [], []

    # -- derived ------------------------------------------------------------------------------------
    def capabilities(self, mode: str):
        caps = self.mode_capabilities
        return caps.get(mode, caps["static"])

    def mode_table(self, mode: str) -> ModeTable:
        if mode in FLOAT_MODES:
            table = self.float_mode_table(mode)
            if table is None:
                raise ConfigError(f"backend {self.name!r} has no {mode} mode")
        else:
            table = ModeTable(self.support_table(), dict(self.static_notes), SpecMaker(self.act_spec, self.weight_spec))
        user = [r.support for r in self.user_rules if r.support is not None]
        if user and mode not in FLOAT_MODES:  # user rows go first: a user pattern wins a tie
            names = {r.name for r in user}
            table = ModeTable(user + [r for r in table.rows if r.name not in names], table.notes, table.specs)
        return table

    def with_rules(self, rules):
        """As :meth:`Backend.with_rules`, and a rule must name a pattern the static support table has or bring
        its own support row: a rule nothing groups under would never run (it used to be ignored silently)."""
        new = super().with_rules(rules)
        known = {row.name for row in self.support_table()} | {r.support.name for r in new.user_rules
                                                              if r.support is not None}
        orphans = sorted({r.name for r in new.user_rules} - known)
        if orphans:
            raise ConfigError(f"{self.name} backend: lowering rule(s) {orphans} name no pattern of the support table "
                              f"and bring no support row (LoweringRule(name, lower, support=OpSupport(name, ops, ...)));"
                              f" patterns: {sorted(row.name for row in self.support_table())}")
        return new

    def fusion_rules(self, mode: str = "static") -> RuleSet:
        return RuleSet(Rule(row.name, row.ops) for row in self.mode_table(mode).rows)

    def prepare_passes(self, config, mode: str) -> list:
        table = self.mode_table(mode)
        before, after = self.extra_passes(config, mode)
        passes = [Normalize(), FoldBatchNorm(), *before, FuseGroups(self.fusion_rules(mode)),
                  Annotate(table.rows, config, table.specs, self.name, table.notes)]
        if mode in FLOAT_MODES:
            passes.append(FloatOutputGroups({r.name: r.note for r in table.rows}, mode, table.notes))
        return passes + list(after)
