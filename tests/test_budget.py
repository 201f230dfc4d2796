"""AccuracyBudget: rank by a cheap proxy, move harmful layers back, resume from the saved state."""
import json

import pytest
import torch
from torch import nn

import qcompile
from qcompile import AccuracyBudget, WeightSpec


def _case():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(16, 10)).eval()
    with torch.no_grad():  # one output channel of the middle conv 200x wider: its per-tensor activations lose
        m[2].weight[0] *= 200
        m[4].weight[:, 0] /= 200
    cal = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    val = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    with torch.no_grad():
        ref = [m(x) for x in val]

    def cosine(fn):  # the user's metric: mean cosine of the outputs with float, 1.0 for the float model
        with torch.no_grad():
            return float(torch.cat([torch.cosine_similarity(fn(x), r, dim=-1) for x, r in zip(val, ref)]).mean())
    return m, cal, val, cosine


KW = dict(backend="x86", weights=WeightSpec(bits=4), algorithm=[])


@pytest.mark.slow
def test_budget_moves_the_most_harmful_layers_until_the_metric_holds(tmp_path):
    m, cal, val, cosine = _case()
    plain = qcompile.compile(m, (val[0],), calibration=cal, verify=False, **KW)
    budget = AccuracyBudget(metric=cosine, data=val, max_drop=0.0002, state_path=str(tmp_path / "s.json"), progress=False)
    art = qcompile.compile(m, (val[0],), calibration=cal, accuracy=budget, **KW)
    rep = art.report.budget
    assert cosine(plain) < 1 - 0.0002  # plain 4-bit misses the budget ...
    assert rep["met"] and cosine(art) >= 1 - 0.0002 - 1e-6 and 1 <= len(rep["moved"]) < 6  # ... the search meets it
    assert [s["moved"] for s in rep["steps"]][0] == [] and all("latency_ms" in s for s in rep["steps"])
    assert rep["steps"][1]["moved"] == [["2", "int8"]]  # the worst layer (the wide channel's) first, 4 -> 8 bits
    assert rep["moved"] == [["2", "float"], ["4", "float"]]  # then float: its activations were the problem
    assert rep["size_cost_bytes"] > 0


def test_budget_resumes_from_saved_state_with_the_same_answer(tmp_path, monkeypatch):
    m, cal, val, cosine = _case()
    path = tmp_path / "state.json"
    budget = AccuracyBudget(metric=cosine, data=val, max_drop=0.0002, state_path=str(path), progress=False)
    first = qcompile.compile(m, (val[0],), calibration=cal, accuracy=budget, **KW).report.budget
    state = json.loads(path.read_text())
    assert len(state["steps"]) >= 2
    state["steps"] = state["steps"][:-1]  # interrupted before the last step finished
    path.write_text(json.dumps(state))
    import qcompile.pipeline as pipeline  # budget.search compiles through the pipeline
    calls = []
    real = pipeline.compile_model
    monkeypatch.setattr(pipeline, "compile_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = qcompile.compile(m, (val[0],), calibration=cal, accuracy=budget, **KW).report.budget
    assert again["moved"] == first["moved"] and again["metric"] == first["metric"]
    assert len(calls) == 2  # the unfinished step and the returned artifact; the rest replayed from the file
