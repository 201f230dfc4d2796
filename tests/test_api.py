"""Public API behaviour: calibration forms, config, strict mode, report export, save/load, and bad input."""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcompile
from qcompile.annotation import FLOAT_EXCLUDED


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return torch.softmax(self.head(F.adaptive_avg_pool2d(y, 1).flatten(1)), -1)


def _data(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 16, 16, generator=g) for _ in range(n)]


def test_compile_steps_equal_one_call_and_model_untouched():
    m = Small().eval()
    before = copy.deepcopy(m.state_dict())
    x = _data(1, 9)[0]
    art = qcompile.compile(m, (x,), calibration=_data(), progress=False, algorithm="rtn")  # a manual loop runs none
    prepared = qcompile.prepare(m, (x,))
    for s in _data():
        prepared(s)
    art2 = qcompile.convert(prepared)
    assert torch.equal(art(x), art2(x))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not m.training


def test_calibration_accepts_tuples_and_dicts():
    m = Small().eval()
    x = _data(1, 9)[0]
    a = qcompile.compile(m, (x,), calibration=[(s,) for s in _data()], progress=False)
    b = qcompile.compile(m, (x,), calibration=[{"x": s} for s in _data()], progress=False)
    assert torch.equal(a(x), b(x))


def test_dynamic_batch():
    m = Small().eval()
    art = qcompile.compile(m, (_data(1, 9)[0],), calibration=_data(), progress=False)
    assert art(torch.randn(5, 3, 16, 16)).shape == (5, 4)


def test_explain_predicts_and_names_reasons():
    rep = qcompile.explain(Small().eval(), (_data(1)[0],))
    assert rep.predicted
    assert set(rep.float_nodes()) == {"softmax"}
    assert "softmax" in rep.float_nodes()["softmax"]
    assert [r.name for r in rep.rows if r.op == "batch_norm"] == []  # folded into the conv


def test_strict_raises_naming_the_node_and_allow_float():
    with pytest.raises(qcompile.StrictFallbackError, match="softmax"):
        qcompile.compile(Small().eval(), (_data(1)[0],), calibration=_data(), strict=True, progress=False)
    art = qcompile.compile(Small().eval(), (_data(1)[0],), calibration=_data(), strict=True,
                           allow_float={"softmax"}, progress=False)
    assert art.report.float_nodes() == {"softmax": art.report.float_nodes()["softmax"]}


def test_exclude_by_name_type_and_regex():
    x = _data(1)[0]
    for exclude in (["conv"], [nn.Conv2d], [r"co.v"]):
        rep = qcompile.explain(Small().eval(), (x,), exclude=exclude)
        (conv,) = [r for r in rep.rows if r.op == "conv2d"]
        assert conv.status == FLOAT_EXCLUDED
    cfg = qcompile.QConfig(module_types={nn.Linear: None})
    rep = qcompile.explain(Small().eval(), (x,), config=cfg, quantize_outputs=True)
    assert [r.status for r in rep.rows if r.op == "linear"] == [FLOAT_EXCLUDED]


def test_config_the_backend_cannot_honour_is_an_error():
    x = _data(1)[0]
    with pytest.raises(qcompile.ConfigError, match="symmetric"):
        qcompile.explain(Small().eval(), (x,), weights=qcompile.WeightSpec(symmetric=False))
    with pytest.raises(qcompile.ConfigError, match="unknown option"):
        qcompile.explain(Small().eval(), (x,), wieghts=qcompile.WeightSpec())
    with pytest.raises(qcompile.ConfigError, match="unknown backend"):
        qcompile.explain(Small().eval(), (x,), backend="tpu9000")


def test_report_json_html_and_effective_config(tmp_path):
    art = qcompile.compile(Small().eval(), (_data(1)[0],), calibration=_data(), progress=False,
                           activations=qcompile.ActivationSpec(observer="percentile"))
    d = json.loads(art.report.to_json(str(tmp_path / "r.json")))
    assert d["summary"]["by_status"]["int8"] >= 6 and "percentile" in d["config"]["activations"]
    assert "softmax" in art.report.to_html(str(tmp_path / "r.html"))
    assert "int8 share" in str(art.report)


def test_save_load_round_trip_and_atomic(tmp_path):
    x = _data(1, 9)[0]
    art = qcompile.compile(Small().eval(), (x,), calibration=_data(), progress=False)
    path = str(tmp_path / "m.qc")
    art.save(path)
    art2 = qcompile.load(path)
    assert torch.equal(art(x), art2(x))
    assert [r.status for r in art2.report.rows] == [r.status for r in art.report.rows]
    bad = str(tmp_path / "sub" / "bad.qc")
    art.reference.graph = art.reference.graph  # keep: now break the export to make save fail
    art._save_qc = lambda tmp: (_ for _ in ()).throw(RuntimeError("disk full"))
    with pytest.raises(RuntimeError):
        art.save(bad)
    assert not os.path.exists(bad) and not [f for f in os.listdir(tmp_path / "sub")]


# -- bad input ------------------------------------------------------------------------------------
class ValueBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


def test_untraceable_model_names_the_source_line():
    with pytest.raises(qcompile.CaptureError) as e:
        qcompile.explain(ValueBranch(), (torch.randn(2, 3),))
    msg = str(e.value)
    assert "test_api.py" in msg and "fix:" in msg


def test_op_the_backend_lacks_is_a_recorded_fallback():
    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(F.gelu(self.fc(x)))

    rep = qcompile.explain(Gelu().eval(), (torch.randn(2, 4),))
    assert "gelu" in rep.float_nodes() and "gelu" in rep.float_nodes()["gelu"]


def test_nan_calibration_names_the_tensor():
    data = _data()
    data[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(qcompile.CalibrationError, match="NaN"):
        qcompile.compile(Small().eval(), (_data(1)[0],), calibration=data, progress=False)


def test_no_or_empty_calibration():
    x = _data(1)[0]
    with pytest.raises(qcompile.CalibrationError, match="calibration="):
        qcompile.compile(Small().eval(), (x,), progress=False)
    with pytest.raises(qcompile.CalibrationError, match="empty"):
        qcompile.compile(Small().eval(), (x,), calibration=[], progress=False)
    with pytest.raises(qcompile.CalibrationError, match="no calibration data"):
        qcompile.convert(qcompile.prepare(Small().eval(), (x,)))


def test_wrong_example_inputs_and_wrong_call_inputs():
    with pytest.raises(qcompile.InputError, match="failed to run on the example inputs"):
        qcompile.explain(Small().eval(), (torch.randn(2, 5, 16, 16),))
    with pytest.raises(qcompile.InputError):
        qcompile.explain(Small().eval(), None)
    art = qcompile.compile(Small().eval(), (_data(1)[0],), calibration=_data(), progress=False)
    with pytest.raises(qcompile.InputError, match="compiled for"):
        art(torch.randn(2, 3, 20, 20))
    with pytest.raises(qcompile.CalibrationError, match="labels|elements"):
        qcompile.compile(Small().eval(), (_data(1)[0],), calibration=[(s, 0) for s in _data()], progress=False)
