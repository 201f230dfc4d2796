"""The honest report: shares of ALL weights and stored bytes, held-out verification as a distribution,
per-layer SQNR, calibration health, and a text table that keeps every reason whole."""
import json

import pytest
import torch
from torch import nn

import qcompile
import _zoo as zoo
from qcompile.qparams import sqnr


class TextNet(nn.Module):
    """Embedding + LSTM + LayerNorm stay float on x86; only fc1 is int8."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(2000, 32)
        self.rnn = nn.LSTM(32, 32, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 4)

    def forward(self, ids):
        h, _ = self.rnn(self.emb(ids))
        return self.fc2(torch.relu(self.fc1(self.norm(h[:, -1]))))


def _ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2000, (4, 12), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def text_art():
    torch.manual_seed(0)
    model = TextNet().eval()
    calib = _ids(16, 0)
    return model, qcompile.compile(model, (calib[0],), backend="x86", calibration=calib), calib


def test_float_embeddings_and_rnn_give_the_true_parameter_and_byte_share(text_art):
    model, art, _ = text_art
    s = art.report.summary()
    int8 = sum(p.numel() for fc in (model.fc1, model.fc2) for p in fc.parameters())
    total = sum(p.numel() for p in model.parameters())
    # fc1 + its fused relu, and the head fc2 (int8 GEMM with fp32 logits: quantize_outputs=False)
    assert art.report.int8_nodes() == ["linear", "relu", "linear_1"]
    assert s["int8_param_share"] == pytest.approx(int8 / total, abs=1e-4)  # 0.029, not 100 %
    # stored bytes: fc1's / fc2's int8 codes + per-channel scales / zero points among every stored tensor
    storage = art.report.storage
    q = sum(r["bytes"] for r in storage if r["layer"] and r["role"] in ("codes", "scales", "zero_points"))
    assert q >= model.fc1.weight.numel() and s["int8_byte_share"] == pytest.approx(q / sum(r["bytes"] for r in storage),
                                                                                    abs=1e-4)
    assert s["int8_byte_share"] < 0.02 and s["int8_mac_share"] > 0.0
    assert "stored bytes" in str(art.report)


def test_bert_shaped_model_counts_embeddings_and_norms():
    model = zoo.make_bert_encoder(layers=1, hidden=64, heads=2, intermediate=128)
    calib = [zoo._bert_inputs(batch=2, seq=16, seed=s) for s in range(8)]
    rep = qcompile.explain(model, calib[0], backend="x86")
    linears = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    assert rep.summary()["int8_param_share"] == pytest.approx(linears / total, abs=1e-4)
    assert rep.summary()["int8_byte_share"] is None  # nothing stored yet: explain predicts
    assert rep.summary()["int8_mac_share"] > 0.9


def test_heldout_verification_is_a_distribution_over_the_calibration_tail(text_art):
    model, art, calib = text_art
    h = art.report.heldout
    assert h["source"].startswith("calibration tail (2 samples") and len(h["batches"]) == 2
    with torch.no_grad():
        for b, x in zip(h["batches"], calib[-2:]):
            assert b["sqnr_vs_float_db"] == pytest.approx(sqnr(model(x), art(x)), abs=1e-6)
    vals = [b["sqnr_vs_float_db"] for b in h["batches"]]
    assert h["summary"]["sqnr_vs_float_db_min"] == pytest.approx(min(vals), abs=1e-4)
    assert h["summary"]["sqnr_vs_float_db_min"] <= h["summary"]["sqnr_vs_float_db_median"]
    assert 0.0 <= h["summary"]["within_one_step_min"] <= 1.0
    assert "held-out verification" in str(art.report)


def test_verify_data_option_and_per_layer_sqnr(text_art):
    model, _, calib = text_art
    extra = _ids(3, 7)
    art = qcompile.compile(model, (calib[0],), backend="x86", calibration=calib[:4], verify_data=extra)
    h = art.report.heldout
    assert h["source"] == "verify_data" and len(h["batches"]) == 3
    layers = {r["value"]: r for r in art.report.layer_sqnr}
    assert set(layers) == {"layer_norm", "relu"}  # fc1's input and its fused relu's output
    assert layers["layer_norm"]["module"] == "norm"
    assert all(r["sqnr_db"] > 10 for r in art.report.layer_sqnr)
    assert {a["tensor"] for a in art.report.activations} == {"layer_norm", "relu"}
    a = next(a for a in art.report.activations if a["tensor"] == "relu")
    assert a["x0"] <= a["lo"] < a["hi"] <= a["x1"] and sum(a["counts"]) == 3 * 4 * 64


def test_text_table_keeps_long_reasons_whole(text_art):
    _, art, _ = text_art
    text = str(art.report)
    long = [r.reason for r in art.report.rows if len(r.reason) > 40]
    assert long and all(reason in text for reason in long)


def test_a_loaded_artifact_keeps_what_the_compile_measured(tmp_path):
    """inspect / report FILE show the held-out verification, per-layer SQNR and health of the compile."""
    import torch
    from torch import nn
    import qcompile
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    g = torch.Generator().manual_seed(0)
    cal = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(8)]
    art = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal,
                           verify_data=[torch.randn(2, 3, 8, 8, generator=g) for _ in range(2)])
    assert art.report.heldout and art.report.layer_sqnr
    back = qcompile.load(art.save(str(tmp_path / "m.qc")))
    assert back.report.heldout == json.loads(json.dumps(art.report.heldout, default=str))
    assert len(back.report.layer_sqnr) == len(art.report.layer_sqnr)
    assert back.report.to_dict()["heldout"]["summary"] == art.report.heldout["summary"]


def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()


def test_the_calibration_tail_is_held_out_not_calibrated_on():
    """The last 1/8 of the calibration list is verified on and never seen by the observers: a tail scaled
    10x out of range leaves the ranges where the first samples put them, and the report shows it clipping."""
    model = _conv_model()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(14)] + [10 * torch.randn(2, 3, 8, 8, generator=g)
                                                                       for _ in range(2)]
    art = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal)
    same = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal[:14], verify_data=cal[14:])
    h = art.report.heldout
    assert h["source"].startswith("calibration tail (2 samples held out of 16") and len(h["batches"]) == 2
    assert [b["sqnr_vs_float_db"] for b in h["batches"]] == pytest.approx(
        [b["sqnr_vs_float_db"] for b in same.report.heldout["batches"]], abs=1e-6)  # calibrated on cal[:14] only
    with torch.no_grad():
        for x in cal[14:]:
            assert sqnr(model(x), art(x)) < sqnr(model(cal[0]), art(cal[0])) - 10  # the tail clips
    clipped = art.report.health["heldout_clipped_share"]
    assert clipped and max(clipped.values()) > 0.1


def test_prepare_convert_reports_held_out_verification_and_health():
    """The step-by-step API verifies on held-out data too: convert(prepared, verify_data=...)."""
    model = _conv_model()
    g = torch.Generator().manual_seed(2)
    cal = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(6)]
    held = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(3)]
    prepared = qcompile.prepare(model, (cal[0],), backend="x86")
    for x in cal:
        prepared(x)  # manual calibration: the ranges are tracked all the same
    art = qcompile.convert(prepared, verify_data=held)
    ref = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal, verify_data=held, algorithm="rtn")
    h = art.report.heldout
    assert h["source"] == "verify_data" and len(h["batches"]) == 3
    assert [b["sqnr_vs_float_db"] for b in h["batches"]] == pytest.approx(
        [b["sqnr_vs_float_db"] for b in ref.report.heldout["batches"]], abs=1e-6)
    assert art.report.layer_sqnr and art.report.activations and "findings" in art.report.health
    assert art.report.health["range_growth"] == ref.report.health["range_growth"]
    plain = qcompile.convert(qcompile.prepare(model, (cal[0],), backend="x86").calibrate(cal))
    assert plain.report.heldout["source"] == "example inputs"
