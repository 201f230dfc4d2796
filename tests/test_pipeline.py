"""The one pipeline and the one backend contract: every built-in backend satisfies the contract the
pipeline calls, option parsing is shared, the orchestration modules import without cycles, and the report
of a compiled artifact is the report of the same artifact loaded back (one assembly)."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import qcompile
from qcompile import ConfigError
from qcompile.backends import Backend, Lowered, TableBackend, get_backend
from qcompile.backends.base import REQUIRED, TAKES_MODE, check_backend
from qcompile.pipeline import HOOKS, Options

ROOT = Path(qcompile.__file__).resolve().parent
BUILTIN = ["x86", "onnx", "executorch"]


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_backends_implement_the_contract(name):
    be = get_backend(name)
    assert isinstance(be, TableBackend) and isinstance(be, Backend)
    check_backend(type(be), name)  # raises on a missing method or a method without mode
    assert set(REQUIRED) <= {m for m in dir(be) if callable(getattr(be, m))}
    opts = be.options
    assert dataclasses.is_dataclass(opts) and type(opts).__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.__setattr__(dataclasses.fields(opts)[0].name, None)
    with pytest.raises(ConfigError, match=rf"{name} backend: unknown option\(s\) \['nope'\]; options are \["):
        get_backend(name, nope=1)
    for mode in be.capabilities("static").modes:
        passes = be.prepare_passes(be.default_config(mode), mode)
        names = [type(p).__name__ for p in passes]
        assert names[:2] == ["Normalize", "FoldBatchNorm"] and "Annotate" in names and "FuseGroups" in names
        assert ("FloatOutputGroups" in names) == (mode in ("dynamic", "weight_only"))


def test_the_prepare_pipeline_is_built_once_from_the_backends_data():
    """x86 and ONNX differ only in their data: the same pass list, their own tables / specs."""
    x86, onnx = get_backend("x86"), get_backend("onnx")
    for mode in ("static", "dynamic", "weight_only"):
        a = [type(p).__name__ for p in x86.prepare_passes(x86.default_config(mode), mode)]
        b = [type(p).__name__ for p in onnx.prepare_passes(onnx.default_config(mode), mode)]
        # static: both write SDPA out for int8 attention matmuls (x86: where large enough, attention="auto")
        assert ("DecomposeSDPA" in a) == ("DecomposeSDPA" in b) == (mode == "static")
        # x86 static adds full-range weights for fp32-output depthwise convs where oneDNN sums in int32 (VNNI)
        from qcompile.backends.x86.kernel_choice import cpu_has_vnni
        from qcompile.backends.x86.rules import conv_float_output_available
        extra = {"dynamic": ["AnnotateRecurrent"], "weight_only": [],
                 "static": ["FullRangeConvWeights"] if conv_float_output_available() and cpu_has_vnni()
                 else []}[mode]
        # ONNX static: a conv feeding the model output writes int8 (ORT has no fast int8 conv with a float result)
        onnx_only = ["QuantizedOutputConvs"] if mode == "static" else []
        assert [n for n in b if n in onnx_only] == onnx_only
        b = [n for n in b if n not in onnx_only]
        assert a[:len(b)] == b and a[len(b):] == extra
        fp32 = get_backend("x86", attention="float")  # x86 with attention always fp32: SDPA stays fused
        assert "DecomposeSDPA" not in [type(p).__name__ for p in fp32.prepare_passes(fp32.default_config(mode), mode)]
    for cls in (type(x86), type(onnx), type(get_backend("executorch"))):
        assert "prepare_passes" not in vars(cls) and "__init__" not in vars(cls)  # inherited, not copied


def test_lowered_is_the_documented_dataclass():
    fields = {f.name for f in dataclasses.fields(Lowered)}
    assert fields == {"kernels", "fallbacks", "taps", "gm", "storage"}
    torch.manual_seed(0)
    m, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), torch.randn(4, 8)
    for name in ("x86", "onnx"):
        art = qcompile.compile(m, (x,), name, calibration=[x])
        assert isinstance(art.lowered, Lowered) and art.lowered.kernels


def test_hooks_and_options_are_validated_in_one_place():
    assert list(HOOKS) == ["after_capture", "after_annotate", "before_lower"]
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['pases'\]; valid options: \[.*'passes'"):
        Options.parse({"pases": {}})
    with pytest.raises(ConfigError, match="passes must be a dict"):
        Options.parse({"passes": [lambda gm: False]})


def _imports(path: Path) -> set[str]:
    """Modules of the qcompile package a file imports at module level (lazy imports inside functions are
    deliberate and not counted)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add(node.module.split(".")[0] if node.module else node.names[0].name)
    return out


def test_orchestration_imports_form_no_cycle():
    """api -> qat -> pipeline -> artifact: the pipeline knows none of the public verbs' modules."""
    names = ("api", "qat", "pipeline", "artifact", "loading", "budget", "report")
    graph = {n: _imports(ROOT / f"{n}.py") & set(names) for n in names}
    assert not graph["pipeline"] & {"api", "qat", "budget", "loading"}
    lazy = {node.module for node in ast.walk(ast.parse((ROOT / "artifact.py").read_text()))
            if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert not lazy & {"pipeline", "api", "qat", "loading"}  # not even inside a function
    assert "api" not in graph["qat"] | graph["budget"] | graph["artifact"]
    seen, stack = set(), []

    def visit(n):
        assert n not in stack, f"import cycle: {' -> '.join(stack + [n])}"
        if n in seen:
            return
        stack.append(n)
        for m in graph[n]:
            visit(m)
        stack.pop()
        seen.add(n)
    for n in names:
        visit(n)


def test_no_contract_probing_left_in_the_orchestration():
    for f in ("api.py", "qat.py", "pipeline.py", "artifact.py"):
        text = (ROOT / f).read_text()
        for probe in ("inspect.signature", "_takes_mode", "_by_mode", "_for_mode", 'getattr(self.backend',
                      'getattr(backend', "getattr(ctx.backend", "getattr(be,", "SimpleNamespace"):
            assert probe not in text, f"{f} still has {probe}"


@pytest.mark.parametrize("mode", ["static", "weight_only"])
def test_loaded_artifact_has_the_compiled_report(tmp_path, mode):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    art = qcompile.compile(m, (x,), "x86", calibration=[x] if mode == "static" else None, mode=mode)
    loaded = qcompile.load(art.save(tmp_path / "m.qc"))
    a, b = art.report.to_dict(), loaded.report.to_dict()
    for key in ("summary", "nodes", "storage", "weight_rounding", "verify", "config"):
        assert a[key] == b[key], key
    assert a["storage"] and torch.equal(art(x), loaded(x))
