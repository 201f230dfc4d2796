"""The rewrite engine (qcompile.passes.rewrite): pattern + check-with-reason + rewrite, one loop."""
from __future__ import annotations

import os
import re

import pytest
import torch

from qcompile.passes.rewrite import Rule, RuleSet, rewrite_graph, run

aten = torch.ops.aten


class ConvBnRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _graph():
    return torch.export.export(ConvBnRelu().eval(), (torch.randn(1, 3, 8, 8),)).module()


def _conv(gm):
    return next(n for n in gm.graph.nodes if n.target == aten.conv2d.default)


def test_largest_pattern_wins_and_named_captures():
    gm = _graph()
    rules = RuleSet([Rule("conv", ("conv2d",)), Rule("conv_bn", ("conv2d", "batch_norm"), names=("conv", "bn")),
                     Rule("conv_bn_relu", ("conv2d", "batch_norm", "relu"), names=("conv", "bn", "relu"))])
    rule, m, reasons = rules.match(_conv(gm))
    assert rule.name == "conv_bn_relu" and reasons == []
    assert m["conv"] is _conv(gm) and m["relu"].target == aten.relu.default and len(m) == 3


def test_check_reason_recorded_then_smaller_rule_tried():
    gm = _graph()
    rules = RuleSet([Rule("conv_bn", ("conv2d", "batch_norm"), check=lambda m: "statistics are not constants"),
                     Rule("conv", ("conv2d",))])
    steps = [s for s in run(gm.graph.nodes, rules, gm) if s.match is not None]
    assert [s.match.rule.name for s in steps] == ["conv"]
    assert steps[0].reasons == ("conv_bn: statistics are not constants",)


def test_rewrite_reason_is_final_none_tries_the_next_rule():
    gm = _graph()
    tried = []
    declines = Rule("a", ("conv2d",), benefit=3, rewrite=lambda m: tried.append("a") or "input is not quantized")
    never = Rule("b", ("conv2d",), benefit=2, rewrite=lambda m: tried.append("b") or "unreachable")
    step = next(s for s in run(gm.graph.nodes, RuleSet([declines, never]), gm) if s.match is not None)
    assert step.reason == "input is not quantized" and not step.applied and tried == ["a"]

    tried.clear()
    passes = Rule("a", ("conv2d",), benefit=3, rewrite=lambda m: tried.append("a"))  # None: not its case
    step = next(s for s in run(gm.graph.nodes, RuleSet([passes, never]), gm) if s.match is not None)
    assert step.reason == "unreachable" and tried == ["a", "b"]


def test_predicate_elements_and_matching_does_not_mutate():
    gm = _graph()
    before = str(gm.graph)
    wide = lambda n: n.target == aten.conv2d.default and n.args[1].meta["val"].shape[0] == 4  # noqa: E731
    rules = RuleSet([Rule("wide_conv_relu", (wide, "batch_norm", "relu"))])
    assert [s.match.rule.name for s in run(gm.graph.nodes, rules, gm) if s.match] == ["wide_conv_relu"]
    assert str(gm.graph) == before


def test_rewrite_graph_applies_and_counts():
    gm = _graph()

    def drop_relu(m):  # relu(x) -> x
        m[0].replace_all_uses_with(m[0].args[0])
        m.ctx.graph.erase_node(m[0])
        return True
    assert rewrite_graph(gm, RuleSet([Rule("relu", ("relu",), rewrite=drop_relu)])) == 1
    assert not any(n.target == aten.relu.default for n in gm.graph.nodes)
    assert rewrite_graph(gm, RuleSet([Rule("relu", ("relu",), rewrite=drop_relu)])) == 0


def test_architecture_doc_example_runs():
    doc = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "architecture.md")
    if not os.path.exists(doc):
        pytest.skip("CI runs the tests from a copy without docs/")
    blocks = re.findall(r"```python\n(.*?)```", open(doc, encoding="utf-8").read(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/architecture.md", "exec"), {})


def test_x86_rules_keep_reasons_and_cover_the_support_table():
    from qcompile.backends.x86 import dynamic, rules, support, weight_only
    assert {r.name for r in rules.RULES} == {row.name for row in support.TABLE}
    float_rules = dynamic.RULES + weight_only.RULES
    assert [r.name for r in float_rules] == ["linear_dynamic", "recurrent_dynamic", "linear_weight_only",
                                             "embedding_weight_only"]
