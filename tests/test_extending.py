"""Custom passes at the pipeline's hooks, keep_float, lowering rules users add, the backend contract check,
the template backend installed through its entry point, and the docs' code blocks (docs/extending.md,
docs/passes.md) run as written."""
from __future__ import annotations

import os
import re
import sys
import types
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from torch import nn

import qcompile
from qcompile import ConfigError
from qcompile.backends import LoweringRule, get_backend, register_backend
from qcompile.backends.support import PROPAGATE, OpSupport
from qcompile.passes import Pass, PassResult
from qcompile.passes.infra import PassError

DOCS = Path(__file__).resolve().parent.parent / "docs"


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def _data(n=8):
    torch.manual_seed(0)
    return ConvNet().eval(), torch.randn(2, 3, 12, 12), [torch.randn(2, 3, 12, 12) for _ in range(n)]


def _rows(report):
    return {r.name: r for r in report.rows}


class KeepConv(Pass):
    requires = frozenset({"captured"})

    def __init__(self, target: str):
        self.target = target

    def call(self, gm):
        for n in gm.graph.nodes:
            if n.name == self.target:
                qcompile.keep_float(n, f"{self.target} kept for the test")
        return PassResult(gm, False)


@pytest.mark.parametrize("hook", ["after_capture", "after_annotate"])
def test_keep_float_at_either_hook_keeps_the_group_float_and_strict_accepts_it(hook):
    model, x, cal = _data()
    base = qcompile.compile(model, (x,), "x86", calibration=cal, strict=True)
    assert _rows(base.report)["conv2d"].status == "int8"
    art = qcompile.compile(model, (x,), "x86", calibration=cal, strict=True, passes={hook: [KeepConv("conv2d")]})
    rows = _rows(art.report)
    for name in ("conv2d", "relu"):  # conv + relu are one fusion group
        assert rows[name].status == "float: excluded by user" and rows[name].kernel == ""
        assert rows[name].reason == "kept float by a user pass: conv2d kept for the test"
    assert rows["conv2d_1"].status == "int8" and rows["conv2d_1"].kernel.startswith("quantized::conv2d_relu")
    assert art.report.float_nodes() == {}  # a user decision, not a fallback
    assert art.report.verify["within_one_step"] >= 0.99
    targets = lambda a: [n.target for n in a.lowered.gm.graph.nodes]  # noqa: E731
    assert targets(art).count(torch.ops.aten.conv2d.default) == 1 and torch.ops.aten.conv2d.default not in targets(base)
    assert art.report.verify["sqnr_vs_float_db"] > 40


def test_keep_float_is_honoured_by_explain_and_prepare_qat():
    model, x, _ = _data()
    rep = qcompile.explain(model, (x,), "x86", passes={"after_capture": [KeepConv("conv2d")]})
    assert _rows(rep)["conv2d"].status == "float: excluded by user"
    qat = qcompile.prepare_qat(model.train(), (x,), "x86", passes={"after_annotate": [KeepConv("conv2d")]})
    assert _rows(qcompile.pipeline.predicted_report(qat._ctx))["conv2d"].status == "float: excluded by user"


def test_unknown_hook_and_non_pass_are_config_errors():
    model, x, cal = _data()
    with pytest.raises(ConfigError, match=r"unknown pass hook\(s\) \['after_lower'\]; valid hooks: \['after_capture', "
                                          r"'after_annotate', 'before_lower'\]"):
        qcompile.compile(model, (x,), "x86", calibration=cal, passes={"after_lower": []})
    with pytest.raises(ConfigError, match="neither a qcompile.passes.Pass nor a function"):
        qcompile.explain(model, (x,), "x86", passes={"after_capture": [3]})
    with pytest.raises(ConfigError, match="keep_float.*non-empty"):
        qcompile.explain(model, (x,), "x86", passes={"after_capture": [lambda gm: qcompile.keep_float(
            next(n for n in gm.graph.nodes if n.op == "call_function"), "")]})


class NeedsReference(Pass):
    requires = frozenset({"reference"})

    def call(self, gm):
        q = torch.ops.quantized_decomposed.quantize_per_tensor.default
        gm.meta["seen_quantize"] = sum(n.target == q for n in gm.graph.nodes)
        return PassResult(gm, False)


def test_requires_is_checked_with_the_pass_and_property_named():
    model, x, cal = _data()
    with pytest.raises(PassError, match=r"pass 'NeedsReference' requires the graph to be \['reference'\].*"
                                        r"passes that ran before it: none"):
        qcompile.explain(model, (x,), "x86", passes={"after_capture": [NeedsReference()]})
    art = qcompile.compile(model, (x,), "x86", calibration=cal, passes={"before_lower": [NeedsReference()]})
    assert art.reference.meta["seen_quantize"] == 4  # input, conv, conv, mean: the head's output stays float


def test_with_rules_lowers_a_user_pattern_and_leaves_the_original_backend_alone(tmp_path):
    from qcompile.backends.x86.rules import unary_lut

    class GeluNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

        def forward(self, x):
            return self.b(torch.nn.functional.gelu(self.a(x)))

    torch.manual_seed(0)
    model, x, cal = GeluNet().eval(), torch.randn(4, 16), [torch.randn(4, 16) for _ in range(8)]
    x86 = get_backend("x86")
    rule = LoweringRule("gelu", unary_lut, OpSupport("gelu", ("gelu",), PROPAGATE, act_args=(0,), note="lut"))
    art = qcompile.compile(model, (x,), x86.with_rules([rule]), calibration=cal)
    row = _rows(art.report)["gelu"]
    assert row.status == "int8" and row.kernel == "int8 lookup table (gelu.default)"
    assert art.report.verify["within_one_step"] >= 0.99 and art.report.verify["sqnr_vs_float_db"] > 25
    loaded = qcompile.load(art.save(tmp_path / "gelu.qc"))  # a file carries no code: the rule is not in it
    assert any("user lowering rules ['gelu']" in w for w in loaded.report.warnings)
    assert _rows(loaded.report)["gelu"].status == "float: fell back on the runtime"
    plain = qcompile.compile(model, (x,), x86, calibration=cal)  # with_rules returned a copy
    assert _rows(plain.report)["gelu"].status == "float: unsupported by backend"
    declined = LoweringRule("gelu", lambda m: "the test's kernel declines",
                            OpSupport("gelu", ("gelu",), PROPAGATE, act_args=(0,)))
    art = qcompile.compile(model, (x,), x86.with_rules([declined]), calibration=cal)
    row = _rows(art.report)["gelu"]
    assert row.status == "float: fell back on the runtime" and "the test's kernel declines" in row.reason
    with pytest.raises(ConfigError, match="takes no lowering rules"):
        get_backend("onnx").with_rules([rule])


class _NoMode:
    name, Options, file_extensions, user_rules = "nomode", None, (), ()

    def is_available(self):
        return True, ""

    def capabilities(self):  # no mode: refused
        return None

    default_config = prepare_passes = lower = run = runtime_name = verify_runtime = save = capabilities


def test_registration_checks_the_contract():
    class Incomplete:
        name = "incomplete"

        def is_available(self):
            return True, ""

    with pytest.raises(ConfigError, match=r"does not implement \['Options', 'capabilities', 'default_config', "
                                          r"'file_extensions', 'lower', 'prepare_passes', 'run', 'runtime_name', "
                                          r"'save', 'user_rules', 'verify_runtime'\]"):
        register_backend("incomplete", Incomplete)
    with pytest.raises(ConfigError, match=r"\['capabilities', 'default_config', 'prepare_passes', 'lower', "
                                          r"'verify_runtime'\] must take a 'mode' argument"):
        register_backend("nomode", _NoMode)
    with pytest.raises(ConfigError, match=r"backend 'incomplete' \(.*Incomplete\) does not implement"):
        get_backend(Incomplete())  # a backend object passed to compile() is checked the same way


def _toy_installed() -> bool:
    return any(ep.name == "toy" for ep in entry_points(group="qcompile.backends"))


def _require_toy():
    if not _toy_installed():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI must install examples/toy_backend (pip install --no-deps ./examples/toy_backend)")
        pytest.skip("the template backend is not installed: pip install --no-deps ./examples/toy_backend")


def test_toy_backend_from_its_entry_point_runs_int8_conv_linear_and_verifies():
    _require_toy()
    model, x, cal = _data()
    art = qcompile.compile(model, (x,), "toy", calibration=cal, quantize_outputs=True)
    rows = _rows(art.report)
    assert type(art.backend).__module__ == "qcompile_toy.backend"
    assert {n: r.kernel for n, r in rows.items() if r.status == "int8"} == {
        "conv2d": "toy int8 conv2d (int32 accumulate, int8 out)", "conv2d_1": "toy int8 conv2d (int32 accumulate, "
        "int8 out)", "linear": "toy int8 linear (int32 accumulate, int8 out)"}
    assert {rows[n].status for n in ("relu", "relu_1", "mean")} == {"float: unsupported by backend"}
    v = art.report.verify
    # integer kernels vs the reference graph's float simulation: bias rounding moves a value by one step at most
    assert v["within_one_step"] == 1.0 and v["max_error_in_steps"] <= 1.001 and v["sqnr_vs_reference_db"] > 30
    assert v["sqnr_vs_float_db"] > 20 and v["toy_int8_kernels"] == 3 and v["toy_float_fallbacks"] == {}
    assert art.report.summary()["int8_mac_share"] == 1.0
    assert torch.equal(art(x), art(x)) and art(torch.randn(5, 3, 12, 12)).shape == (5, 4)


def test_toy_backend_saves_and_loads(tmp_path):
    _require_toy()
    model, x, cal = _data()
    art = qcompile.compile(model, (x,), "toy", calibration=cal)
    loaded = qcompile.load(art.save(tmp_path / "m.qc"))
    assert loaded.backend.name == "toy" and torch.equal(loaded(x), art(x))
    assert [(r.name, r.status, r.kernel) for r in loaded.report.rows] == \
        [(r.name, r.status, r.kernel) for r in art.report.rows]
    assert loaded.report.storage == art.report.storage


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("doc", ["extending.md", "passes.md"])
def test_docs_python_blocks_run(doc, tmp_path, monkeypatch):
    if doc == "extending.md":
        _require_toy()
    blocks = _python_blocks(DOCS / doc)
    assert len(blocks) >= (7 if doc == "extending.md" else 2)
    monkeypatch.chdir(tmp_path)
    import qcompile.backends as registry
    monkeypatch.setattr(registry, "_EXTRA", dict(registry._EXTRA))  # the docs register "sim": not for later tests
    module = types.ModuleType(f"docs_{doc.replace('.', '_')}")  # a real module: dataclasses look it up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{doc} block {i + 1}", "exec"), module.__dict__)
        except Exception as e:
            raise AssertionError(f"docs/{doc}, python block {i + 1} failed: {type(e).__name__}: {e}") from e


@pytest.mark.parametrize("backend", ["onnx", "executorch", "toy"])
def test_keep_float_is_honoured_by_every_backends_lowering(backend):
    if backend == "toy":
        _require_toy()
    model, x, cal = _data()
    art = qcompile.compile(model, (x,), backend, calibration=cal, passes={"after_annotate": [KeepConv("conv2d")]})
    rows = _rows(art.report)
    assert rows["conv2d"].status == "float: excluded by user"
    assert rows["conv2d"].kernel in ("", "ReorderOutput (float)", "XNNPACK fp32 convolution")  # runs float
    assert rows["conv2d_1"].status == "int8" and rows["conv2d_1"].kernel
    assert art.report.verify["within_one_step"] >= 0.99 and art.report.verify["sqnr_vs_float_db"] > 40


def test_a_rule_no_pattern_groups_under_is_refused_not_ignored():
    from qcompile.backends import LoweringRule, get_backend
    from qcompile.backends.x86.rules import unary_lut
    with pytest.raises(qcompile.ConfigError, match="name no pattern"):
        get_backend("x86").with_rules([LoweringRule("gelu_typo", unary_lut)])
    assert get_backend("x86").with_rules([LoweringRule("linear", unary_lut)]).user_rules  # an existing pattern
