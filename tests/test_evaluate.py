"""qcompile.evaluate: metric per slice, changed predictions, latency on the artifact's runtime."""
import json

import pytest
import torch

import qcompile
import _zoo as zoo
from qcompile.evaluate import Evaluation
from qcompile.latency import TimingOptions

FAST = TimingOptions(warmup=1, min_repeats=3, max_repeats=4, budget_s=0.05)


@pytest.fixture(scope="module")
def digits():
    model, (x_tr, _, x_te, y_te) = zoo.train_digits_cnn()
    art = qcompile.compile(model, (x_te[:8],), backend="x86", calibration=[x_tr[i:i + 32] for i in range(0, 256, 32)])
    return model, art, x_te, y_te


def _broken_data(x_te):
    """Held-out digits, plus a slice scaled 6x: far outside the calibrated input range [0, 1]."""
    x = torch.cat([x_te, x_te[:60] * 6])
    part = ["held-out"] * len(x_te) + ["scaled x6"] * 60
    return x, part


def test_out_of_range_slice_is_the_worst_and_changed_are_exactly_the_argmax_flips(digits):
    model, art, x_te, _ = digits
    x, part = _broken_data(x_te)
    ev = qcompile.evaluate(art, model, {"inputs": x, "part": part}, slices="part", batch_sizes=(1, 8, 32),
                           timing_options=FAST)
    assert isinstance(ev, Evaluation) and ev.task == "classification" and ev.n_samples == len(x)
    assert ev.metric == "top-1 agreement with reference" and ev.reference_metric == 1.0
    assert [s["slice"] for s in ev.slices] == ["scaled x6", "held-out"]
    worst, held = ev.slices
    assert worst["n"] == 60 and held["n"] == len(x_te)
    assert held["candidate"] >= 0.97 and worst["candidate"] < held["candidate"] - 0.2
    with torch.no_grad():
        lc, lr = art(x), model(x)
    flips = torch.nonzero(lc.argmax(1) != lr.argmax(1)).flatten().tolist()
    assert ev.n_changed == len(flips) and [c["index"] for c in ev.changed] == flips
    first = ev.changed[0]
    i = first["index"]
    assert first["candidate_pred"] == int(lc[i].argmax()) and first["reference_pred"] == int(lr[i].argmax())
    assert first["candidate_conf"] == pytest.approx(lc[i].softmax(-1).max().item(), abs=1e-4)
    assert first["reference_conf"] == pytest.approx(lr[i].softmax(-1).max().item(), abs=1e-4)
    assert first["slice"] == part[i]
    assert ev.agreement == pytest.approx(1 - len(flips) / len(x))


def test_latency_percentiles_per_batch_on_the_artifact_runtime(digits):
    model, art, x_te, _ = digits
    ev = qcompile.evaluate(art, model, x_te[:40], batch_sizes=(1, 8, 32), timing_options=FAST)
    assert ev.runtime["candidate"] == art.backend.runtime_name() and "eager" in ev.runtime["reference"]
    for who in ("candidate", "reference"):
        assert sorted(ev.latency[who]) == [1, 8, 32]
        for b, st in ev.latency[who].items():
            assert 0 < st["p50_ms"] <= st["p90_ms"] <= st["p99_ms"] <= st["max_ms"]
            assert st["runs"] >= 3 and st["throughput_per_s"] == pytest.approx(b / st["p50_ms"] * 1e3, rel=1e-3, abs=0.01)
    assert set(ev.speedup) == {1, 8, 32} and ev.speedup[8]["iqr"][0] <= ev.speedup[8]["median"] <= ev.speedup[8]["iqr"][1]
    assert ev.model_bytes["candidate"] == art.report.sizes["stored_bytes"]
    assert ev.model_bytes["reference"] == sum(p.numel() * 4 for p in model.state_dict().values()
                                              if p.dtype == torch.float32) + 8 * 2  # + 2 BN num_batches_tracked
    assert ev.memory["batch"] == 32
    d = json.loads(ev.to_json())
    assert d["latency"]["candidate"]["32"]["runs"] >= 3 and d["change"] == pytest.approx(ev.change)
    text = str(ev)
    assert "p99" in text and "changed predictions" in text


def test_labels_user_metric_and_slice_function(digits):
    model, art, x_te, y_te = digits

    def accuracy(outputs, targets):
        return (outputs.argmax(-1) == targets).float().mean().item()

    ev = qcompile.evaluate(art, model, {"inputs": x_te, "targets": y_te}, metric=accuracy,
                           slices=lambda s: "bright" if s["inputs"][0].mean() > 0.3 else "dark", batch_sizes=())
    with torch.no_grad():
        want_c = accuracy(art(x_te), y_te)
        want_r = accuracy(model(x_te), y_te)
    assert ev.metric == "accuracy" and ev.candidate_metric == pytest.approx(want_c)
    assert ev.reference_metric == pytest.approx(want_r)
    assert {s["slice"] for s in ev.slices} == {"bright", "dark"} and sum(s["n"] for s in ev.slices) == len(y_te)
    assert ev.slices[0]["change"] <= ev.slices[1]["change"] and ev.latency == {}
    default = qcompile.evaluate(art, model, {"inputs": x_te, "targets": y_te}, slices="targets", batch_sizes=())
    assert default.metric == "top-1 accuracy" and default.candidate_metric == pytest.approx(want_c)
    assert len(default.slices) == 10 and all(r["target"] == int(y_te[r["index"]]) for r in default.changed)


def test_float_module_against_itself_has_no_changes(digits):
    model, _, x_te, _ = digits
    ev = qcompile.evaluate(model, model, [x_te[:16], x_te[16:40]], batch_sizes=(4,), timing_options=FAST)
    assert ev.agreement == 1.0 and ev.n_changed == 0 and ev.changed == [] and ev.candidate_metric == 1.0
    assert "error" not in ev.latency["candidate"][4]


def test_bad_data_is_a_qcompile_error(digits):
    model, art, *_ = digits
    with pytest.raises(qcompile.InputError, match="data"):
        qcompile.evaluate(art, model, 3)
    with pytest.raises(qcompile.InputError, match="'group'"):
        qcompile.evaluate(art, model, {"inputs": torch.rand(4, 1, 8, 8)}, slices="group")


def test_onnx_artifact_latency_comes_from_onnxruntime(digits):
    pytest.importorskip("onnxruntime")
    model, _, x_te, _ = digits
    art = qcompile.compile(model, (x_te[:8],), backend="onnx", calibration=[x_te[i:i + 32] for i in range(0, 128, 32)])
    ev = qcompile.evaluate(art, model, x_te[:64], batch_sizes=(8,), timing_options=FAST)
    assert ev.runtime["candidate"].startswith("onnxruntime") and ev.agreement >= 0.97
    assert ev.model_bytes["candidate"] == art.report.verify["onnx_file_bytes"]


@pytest.mark.slow
def test_minilm_real_sentences_cosine_per_slice():
    case = zoo.minilm_case(max_length=64)
    art = qcompile.compile(case.model, case.example_inputs, backend="x86", mode="dynamic", verify=False)
    enc = case.tokenizer(zoo.SENTENCES, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    topic = ["music"] * 2 + ["cats"] * 2 + ["passwords"] * 2 + ["markets"] * 2 + ["other"] * (len(zoo.SENTENCES) - 8)
    mean_pool = lambda out, b: zoo.mean_pool(out.last_hidden_state, b.args[1])
    ev = qcompile.evaluate(art, case.model, {"inputs": (enc["input_ids"], enc["attention_mask"]), "topic": topic},
                           slices="topic", select=mean_pool, task="embedding", batch_sizes=(1, 8), timing_options=FAST)
    assert ev.task == "embedding" and ev.metric == "cosine to reference"
    emb = case.embed(art)
    assert ev.agreement == pytest.approx((emb * case.reference).sum(-1).mean().item(), abs=1e-4)
    assert [s["n"] for s in ev.slices if s["slice"] == "other"] == [16] and len(ev.slices) == 5
    assert all(s["candidate"] > 0.98 for s in ev.slices)
    assert [s["change"] for s in ev.slices] == sorted(s["change"] for s in ev.slices)
