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
    # the wide channel is conv 2's output: its rounding goes only when producer (2) and consumer (4) are both
    # float, which no single move shows; the search moves on until the budget holds, then undoes every move
    # it holds without (the linear's, the first conv's)
    assert sorted(rep["moved"]) == [["2", "float"], ["4", "float"]]
    assert len(rep["steps"]) > 2 + len(rep["moved"])  # the undo trials are recorded steps too
    assert rep["size_cost_bytes"] > 0
    # MACs (per image): conv0 16*144*27, conv2 and conv4 16*144*144 each, the linear 160; 2 and 4 went float
    assert rep["steps"][0]["int8_mac_share"] == pytest.approx(1.0)
    assert rep["int8_mac_share"] == pytest.approx((62208 + 160) / (62208 + 2 * 331776 + 160), abs=1e-4)


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


def test_proxy_blames_the_stem_for_the_rounding_of_the_model_input():
    """Moving a stem to float also removes the rounding of the model input, which no other module owns: the
    proxy must count it (and the stem's weights), or an image model's worst layer is never ranked."""
    from qcompile import budget as B
    from qcompile import pipeline
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
    with torch.no_grad():
        m[0].weight[:, 0] /= 100  # channel 0 arrives 100x wider and is scaled back by the stem
    scale = torch.tensor([100.0, 1.0, 1.0]).view(1, 3, 1, 1)
    cal = [torch.randn(4, 3, 8, 8) * scale for _ in range(4)]
    val = [torch.randn(4, 3, 8, 8) * scale for _ in range(2)]
    weights: dict = {}
    art = pipeline.compile_model(m, (val[0],), "x86", pipeline.Options.parse(dict(algorithm="rtn")), cal,
                                 verify=False, progress=False, float_weights=weights)
    assert sorted(weights) == ["conv2d", "conv2d_1", "linear"]
    assert torch.equal(weights["conv2d_1"], m[2].weight)  # the float weights convert read
    with torch.no_grad():
        ref = [m(x) for x in val]
    ranking = dict(B.module_harm(art, val, ref, weights))
    # the input's per-tensor scale (~1.6) rounds channels 1 and 2 (std 1) to a few levels: float gains >10 dB
    assert max(ranking, key=ranking.get) == "0" and ranking["0"] > 10 and ranking["0"] > 5 * max(ranking["2"], ranking["5"])
