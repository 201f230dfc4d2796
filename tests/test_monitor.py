"""Drift monitor and calibration health on the real digits (trained CNN, held-out split)."""
import pytest
import torch
from torch import nn

import qcompile
import _zoo as zoo
from qcompile.monitor import FLAG_SHARE


@pytest.fixture(scope="module")
def digits():
    model, (x_tr, _, x_te, _) = zoo.train_digits_cnn()
    calib = [x_tr[i:i + 16] for i in range(0, 512, 16)]
    art = qcompile.compile(model, (x_te[:8],), backend="x86", calibration=calib)
    return model, art, x_tr, x_te


def _kinds(art):
    return [f["kind"] for f in art.report.health["findings"]]


def test_drift_quiet_on_heldout_data_of_the_same_distribution(digits):
    _, art, _, x_te = digits
    mon = art.monitor()
    for i in range(0, 448, 32):
        out = mon(x_te[i:i + 32])
        assert torch.equal(out, art(x_te[i:i + 32]))  # the monitor returns the artifact's own output
    rep = art.drift_report()
    assert rep.batches == 14 and len(rep.tensors) >= 4
    assert rep.flagged == [], str(rep)
    assert all(t.clipped_share <= FLAG_SHARE for t in rep.tensors)


def test_drift_flags_layers_when_inputs_leave_the_calibrated_range(digits):
    _, art, _, x_te = digits
    mon = art.monitor(every=2)
    for i in range(0, 256, 32):
        mon(x_te[i:i + 32] * 3)
    rep = art.drift_report()
    assert rep.batches == 4  # every second batch observed
    first = rep.tensors[0]  # the image input: calibrated on [0, 1], now up to 3
    assert first.tensor == "x" and first.flagged and first.clipped_share > 0.2 and first.batches_clipped == 4
    assert first.max_excursion == pytest.approx(3.0, abs=0.01)
    assert "recalibrate" in str(rep) and rep.to_dict()["flagged"][0] == first.tensor


def test_healthy_calibration_has_no_findings_on_heldout_digits(digits):
    model, _, x_tr, x_te = digits
    art = qcompile.compile(model, (x_te[:8],), backend="x86", calibration=[x_tr[i:i + 16] for i in range(0, 512, 16)],
                           verify_data=[x_te[i:i + 32] for i in range(0, 128, 32)])
    assert _kinds(art) == [], art.report.health["findings"]


def test_too_clean_calibration_is_flagged(digits):
    model, _, x_tr, x_te = digits
    faint = [x_tr[i:i + 16] * 0.4 for i in range(0, 256, 16)]  # low-contrast digits only
    art = qcompile.compile(model, (x_te[:8],), backend="x86", calibration=faint,
                           verify_data=[x_te[i:i + 32] for i in range(0, 128, 32)])
    f = next(f for f in art.report.health["findings"] if f["kind"] == "too clean")
    assert len(f["tensors"]) >= 3 and "percentile" in f["message"]


def test_too_small_calibration_ranges_still_moving(digits):
    model, _, x_tr, x_te = digits
    growing = [x_tr[i:i + 1] * s for i, s in enumerate((0.2, 0.3, 0.5, 0.7, 1.0, 1.0))]
    art = qcompile.compile(model, (x_te[:8],), backend="x86", calibration=growing)
    f = next(f for f in art.report.health["findings"] if f["kind"] == "too small")
    assert "ranges still moving" in f["message"] and len(f["tensors"]) >= 3
    one = qcompile.compile(model, (x_te[:8],), backend="x86", calibration=[x_tr[:8]])
    assert "too small" in _kinds(one)
    # modes that calibrate nothing never hear that their (absent) calibration is too small
    for mode in ("dynamic", "weight_only"):
        art = qcompile.compile(model, (x_te[:8],), backend="x86", mode=mode)
        assert "too small" not in _kinds(art), mode


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.out = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.out(self.inp(x))))


def test_outlier_channels_are_named_with_how_far_out():
    torch.manual_seed(0)
    model = Mixer().eval()
    with torch.no_grad():
        model.inp.weight[5] *= 40  # feature 5 of inp's output is a massive-activation channel
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 16, generator=g) for _ in range(16)]
    art = qcompile.compile(model, (calib[0],), backend="x86", calibration=calib)
    f = next(f for f in art.report.health["findings"] if f["kind"] == "outlier channels")
    assert f["channels"][0] == 5 and f["tensor"] == "linear"
    o = next(o for o in art.report.health["outlier_channels"] if o["tensor"] == "linear")
    assert o["times_median"][0] > 20 and o["n_channels"] == 32
    assert "exclude=['inp']" in f["message"]
