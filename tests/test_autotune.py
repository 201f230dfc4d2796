"""qcompile.autotune: float -> dynamic -> static -> static + algorithms -> budget, fastest that meets it."""
import pytest
import torch
from torch import nn

import qcompile
from qcompile.autotune import format_steps


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def _data(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 12, 12, generator=g) for _ in range(n)]


def test_every_step_is_measured_and_the_fastest_within_budget_is_returned():
    model, cal, val = _model(), _data(0, 4), _data(1, 4)
    art = qcompile.autotune(model, (cal[0],), "x86", calibration=cal,
                            accuracy=qcompile.AccuracyBudget(data=val, max_drop=0.2), repeats=3)
    rep = art.report.autotune
    names = [s["step"] for s in rep["steps"]]
    assert names[:4] == ["float", "dynamic int8", "static int8", "static int8 + algorithms"]
    assert rep["steps"][0]["metric"] == 1.0  # agreement of float with itself
    meeting = [s for s in rep["steps"][1:] if s["meets"]]
    assert meeting and rep["recommendation"] is None
    chosen = next(s for s in rep["steps"] if s["chosen"])
    assert chosen["step"] == rep["chosen"] and chosen["latency_ms"] == min(s["latency_ms"] for s in meeting)
    agreement = qcompile.budget.agreement_metric(model, val)(art)
    assert agreement == pytest.approx(chosen["metric"]) and agreement >= rep["target"]
    text = format_steps(rep)
    assert "* " + rep["chosen"] in text and "static int8 + algorithms" in text


def test_an_impossible_budget_recommends_qat_and_returns_the_best_metric():
    model, cal, val = _model(), _data(0, 4), _data(1, 2)
    perfect_but_one = qcompile.AccuracyBudget(data=val, max_drop=-0.5, max_steps=1, time_limit_s=60)
    art = qcompile.autotune(model, (cal[0],), "x86", calibration=cal, accuracy=perfect_but_one, repeats=2)
    rep = art.report.autotune
    assert rep["steps"][-1]["step"] == "mixed precision under the budget"
    assert not any(s["meets"] for s in rep["steps"][1:])
    assert "prepare_qat" in rep["recommendation"]
    measured = [s for s in rep["steps"][1:] if s["metric"] is not None]
    assert rep["chosen"] == max(measured, key=lambda s: s["metric"])["step"]


def test_autotune_needs_validation_data_and_calibration():
    model, cal = _model(), _data(0, 2)
    with pytest.raises(qcompile.ConfigError, match="AccuracyBudget"):
        qcompile.autotune(model, (cal[0],), "x86", calibration=cal, accuracy=qcompile.AccuracyBudget())
    with pytest.raises(qcompile.ConfigError, match="calibration"):
        qcompile.autotune(model, (cal[0],), "x86", calibration=None, accuracy=qcompile.AccuracyBudget(data=cal))
