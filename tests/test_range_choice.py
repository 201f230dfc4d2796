"""observer="auto": the calibration method per tensor by the model-output error it gives (qcompile.passes.range_choice)."""
import torch
from torch import nn

import qcompile
from qcompile.observers import HistogramObserver, MinMaxObserver, make_observer
from qcompile.qparams import sqnr
from qcompile.specs import ActivationSpec, QuantSpec


def _spec(observer):
    return QuantSpec(dtype=torch.uint8, bits=8, symmetric=False, observer=observer)


def test_auto_reads_every_method_off_one_histogram():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, 32, generator=g) * (1 + i) for i in range(3)]
    auto = make_observer(_spec("auto"))
    assert isinstance(auto, HistogramObserver) and auto.method == "auto"
    for x in xs:
        auto(x)
    for method in ("mse", "percentile", "entropy"):
        own = make_observer(_spec(method))
        for x in xs:
            own(x)
        a, b = auto.qparams_for(method), own.calculate_qparams()
        assert torch.allclose(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point), method
    mm = MinMaxObserver(_spec("minmax"))
    for x in xs:
        mm(x)
    assert torch.allclose(auto.qparams_for("minmax").scale, mm.calculate_qparams().scale)
    # until a choice is made, "auto" is MSE
    assert torch.allclose(auto.calculate_qparams().scale, auto.qparams_for("mse").scale)


class _TwoPaths(nn.Module):
    """Two activations with a heavy tail in channel 0: the tail of ``a`` reaches the output through a weight
    of 1, the tail of ``b`` through 0 (every other channel through 0.05)."""

    def __init__(self):
        super().__init__()
        self.fa, self.fb = nn.Linear(8, 8), nn.Linear(8, 8)
        self.ga, self.gb = nn.Linear(8, 4), nn.Linear(8, 4)
        with torch.no_grad():
            for f in (self.fa, self.fb):
                f.weight.copy_(torch.eye(8) * 2)
                f.bias.zero_()
            for gl, w0 in ((self.ga, 1.0), (self.gb, 0.0)):
                gl.weight.fill_(0.05)
                gl.weight[:, 0] = w0
                gl.bias.zero_()

    def forward(self, x):
        return self.ga(torch.relu(self.fa(x))) + self.gb(torch.relu(self.fb(x)))


def _tail_data(seed, n=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = 0.25 * torch.randn(64, 8, generator=g)
        x[torch.randint(0, 64, (1,), generator=g), 0] = 10.0  # one token per sample: channel 0 is an outlier
        out.append(x)
    return out


def test_the_choice_is_a_local_optimum_of_the_output_error_at_least_as_good_as_every_uniform_method():
    """Brute force over the judged samples: the chosen assignment's output error is <= every uniform
    assignment's, and no single tensor's other range lowers it by the 1 % a sweep step needs."""
    from qcompile.passes.range_choice import MIN_GAIN, _error, _Replay, auto_observers, choose_ranges
    from qcompile.observers import Observer, RANGE_METHODS
    torch.manual_seed(0)
    model = _TwoPaths().eval()
    cal = _tail_data(1)
    prepared = qcompile.prepare(model, (cal[0],), backend="x86", activations=ActivationSpec(observer="auto"))
    for x in cal:
        prepared(x)
    judged = [((x,), {}) for x in cal[:4]]
    rep = choose_ranges(prepared.gm, judged)
    obs = [m for _, m in auto_observers(prepared.gm)]
    assert len(obs) >= 3 and rep["tensors"] == len(obs) and rep["evaluations"] <= 64
    assert sum(rep["methods"].values()) == rep["tensors"]
    chosen = {m: m.chosen for m in obs}
    fixed = {m: m.calculate_qparams() for m in prepared.gm.modules()
             if isinstance(m, Observer) and m not in chosen and m.spec.granularity == "per_tensor"}
    with _Replay(prepared.gm, judged) as replay:
        ref = replay.run(fixed, None)

        def err(assign):
            return _error(ref, replay.run(fixed, {m: m.qparams_for(meth) for m, meth in assign.items()}))
        best = err(chosen)
        for method in RANGE_METHODS:
            assert best <= err({m: method for m in obs}) * (1 + 1e-9), method
        for m in obs:
            for method in RANGE_METHODS:
                assert err({**chosen, m: method}) >= best * (1 - MIN_GAIN) * (1 - 1e-9), (m.name, method)
    assert abs(-10 * torch.log10(torch.tensor(best)).item() - rep["calibration_sqnr_db"]["chosen"]) < 0.01
    # the report names channel 0 of the fa / fb outputs as an outlier channel and says who clips it
    outl = [o for o in rep["outlier_channels"] if o["channels"][0] == 0]
    assert outl and all(set(o) >= {"tensor", "chosen", "clipped_by_mse", "clipped_by_chosen"} for o in outl)


def test_compile_judges_on_held_back_calibration_samples():
    torch.manual_seed(0)
    model = _TwoPaths().eval()
    cal = _tail_data(1)
    art = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal, verify=False, progress=False,
                           activations=ActivationSpec(observer="auto"))
    rep = art.report.algorithms["range_choice"]
    assert rep["judged_on"] == "4 held-back calibration samples" and rep["samples"] == 4
    assert rep["calibration_sqnr_db"]["chosen"] >= rep["calibration_sqnr_db"]["mse"]
    assert "range_choice_s" in art.report.timings
    mse = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal, verify=False, progress=False)
    assert "range_choice" not in mse.report.algorithms  # the default (MSE) judges nothing
    with torch.no_grad():
        assert sqnr(model(cal[0]), art(cal[0])) > 25


def test_judging_leaves_statistics_weights_and_the_users_model_alone():
    from qcompile.passes.range_choice import auto_observers, choose_ranges
    torch.manual_seed(0)
    model = _TwoPaths().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal = _tail_data(3, 6)
    prepared = qcompile.prepare(model, (cal[0],), backend="x86", activations=ActivationSpec(observer="auto"))
    for x in cal:
        prepared(x)
    obs = auto_observers(prepared.gm)
    assert len(obs) >= 3
    stats = [(m.num_batches, m.histogram.clone(), len(m._forward_hooks)) for _, m in obs]
    params = {k: v for k, v in prepared.gm.state_dict(keep_vars=True).items()}
    first = choose_ranges(prepared.gm, [((x,), {}) for x in cal])
    assert [(m.num_batches, len(m._forward_hooks)) for _, m in obs] == [(s[0], s[2]) for s in stats]
    assert all(torch.equal(m.histogram, s[1]) for (_, m), s in zip(obs, stats))
    after = prepared.gm.state_dict(keep_vars=True)
    assert all(after[k] is v for k, v in params.items())  # the float weight objects are back
    assert all(m._replay is None for _, m in obs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    chosen = [m.chosen for _, m in obs]
    second = choose_ranges(prepared.gm, [((x,), {}) for x in cal])
    assert [m.chosen for _, m in obs] == chosen  # deterministic
    assert first["calibration_sqnr_db"] == second["calibration_sqnr_db"]
