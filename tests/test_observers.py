"""Tests of qcompile.observers on known data (fixed seeds)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx
from hypothesis import given, settings, strategies as st

from qcompile.errors import CalibrationError, ConfigError
from qcompile.observers import (HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver,
                                MovingAveragePerChannelMinMaxObserver, Observer, PerChannelMinMaxObserver,
                                PerChannelMSEObserver, PerGroupMinMaxObserver, histogram_kl_costs,
                                histogram_mse_costs, make_observer)
from qcompile.qparams import compute_qparams, fake_quantize, representable_range
from qcompile.specs import QuantSpec

U8 = QuantSpec(dtype=torch.uint8)
S8 = QuantSpec(dtype=torch.int8, symmetric=True)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _laplace(n, seed=0):
    u = torch.rand(n, generator=_gen(seed), dtype=torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).to(torch.float32)


def _width(qp):
    lo, hi = representable_range(qp)
    return float(hi - lo)


def _mse(x, qp):
    return float(((fake_quantize(x, qp) - x).double() ** 2).mean())


def _calibrate(obs, *batches):
    for b in batches:
        assert obs(b) is b
    return obs.calculate_qparams()


def test_minmax_uniform():
    torch.manual_seed(0)
    x = torch.rand(10_000) * 4 - 1
    obs = MinMaxObserver(U8)
    qp = _calibrate(obs, x)
    assert float(obs.min_val) == float(x.min()) and float(obs.max_val) == float(x.max())
    assert math.isclose(float(qp.scale), float(x.max() - x.min()) / 255, rel_tol=1e-6)
    assert int(qp.zero_point) == 64 and obs.num_batches == 1


@pytest.mark.parametrize("spec", [U8, S8, QuantSpec(dtype=torch.int8, granularity="per_channel", axis=1)])
def test_minmax_streaming_equals_one_shot(spec):
    torch.manual_seed(1)
    x = torch.randn(12, 6, 5) * torch.linspace(0.1, 5, 6)[:, None]
    cls = PerChannelMinMaxObserver if spec.granularity == "per_channel" else MinMaxObserver
    one = _calibrate(cls(spec), x)
    stream = _calibrate(cls(spec), *x.split(5))
    assert torch.equal(one.scale, stream.scale) and torch.equal(one.zero_point, stream.zero_point)


def test_moving_average():
    spec = QuantSpec(averaging_constant=0.25)
    obs = MovingAverageMinMaxObserver(spec)
    _calibrate(obs, torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 6.0]))
    assert float(obs.min_val) == pytest.approx(-1.5) and float(obs.max_val) == pytest.approx(3.0)
    assert obs.num_batches == 2


def test_percentile_clips_single_outlier():
    torch.manual_seed(2)
    x = torch.randn(200_000)
    x[123] = 1000.0
    spec = QuantSpec(observer="percentile", percentile=99.99)
    qp = _calibrate(make_observer(spec), x)
    lo, hi = representable_range(qp)
    assert 3.0 < float(hi) < 6.0 and -6.0 < float(lo) < -3.0
    assert _width(_calibrate(MinMaxObserver(spec), x)) > 1000
    full = _calibrate(make_observer(QuantSpec(observer="percentile", percentile=100.0)), x)
    assert float(representable_range(full)[1]) >= 999.0


def test_percentile_keeps_zero_for_positive_data():
    x = torch.rand(50_000, generator=_gen(3)) + 5.0
    qp = _calibrate(make_observer(QuantSpec(observer="percentile", percentile=99.0)), x)
    assert int(qp.zero_point) == 0 and float(fake_quantize(torch.tensor(0.0), qp)) == 0.0


MSE_SPECS = [U8, S8, QuantSpec(dtype=torch.int8), QuantSpec(dtype=torch.uint8, bits=4),
             QuantSpec(dtype=torch.int8, bits=4, symmetric=True, narrow=True)]


@pytest.mark.parametrize("base", MSE_SPECS, ids=lambda s: s.describe())
def test_mse_beats_minmax_on_heavy_tails(base):
    x = _laplace(200_000, seed=4)
    for data in (x, x.relu()):
        mse_qp = _calibrate(make_observer(QuantSpec(**{**base.__dict__, "observer": "mse"})), data)
        mm_qp = _calibrate(MinMaxObserver(base), data)
        assert _mse(data, mse_qp) < 0.95 * _mse(data, mm_qp)


@pytest.mark.parametrize("base", MSE_SPECS, ids=lambda s: s.describe())
def test_mse_never_much_worse_on_uniform(base):
    x = torch.rand(100_000, generator=_gen(5)) * 3 - 1
    spec = QuantSpec(**{**base.__dict__, "observer": "mse"})
    obs = make_observer(spec)
    qp = _calibrate(obs, *x.split(25_000))
    assert _mse(x, qp) <= 1.01 * _mse(x, _calibrate(MinMaxObserver(base), x))


@pytest.mark.parametrize("base", [U8, S8, QuantSpec(dtype=torch.int8)], ids=lambda s: s.describe())
def test_entropy_narrower_on_heavy_tails(base):
    x = _laplace(200_000, seed=6) * 0.3
    spec = QuantSpec(**{**base.__dict__, "observer": "entropy"})
    for data in (x, x.relu()):
        ent = _calibrate(make_observer(spec), *data.split(50_000))
        mm = _calibrate(MinMaxObserver(base), data)
        assert _width(ent) < 0.95 * _width(mm)
        assert float(fake_quantize(torch.tensor(0.0), ent)) == 0.0
        assert _mse(data, ent) < _mse(data, mm)


def test_histogram_rebinning_keeps_count_and_quantiles():
    torch.manual_seed(7)
    batches = [torch.randn(5_000) * 0.01, torch.randn(5_000) + 3.0, torch.randn(5_000) * 10 - 20,
               torch.zeros(100), torch.rand(5_000) * 100, torch.randn(5_000)]
    obs = HistogramObserver(QuantSpec(observer="percentile", percentile=99.0))
    total = 0
    for b in batches:
        obs(b)
        total += b.numel()
        assert float(obs.histogram.sum()) == total
        assert obs.hist_min <= min(float(obs.min_val), 0.0)
        assert obs.hist_max >= max(float(obs.max_val), 0.0)
    assert obs.histogram.numel() == 2048
    allx = torch.cat(batches)
    lo, hi = obs._range()
    tol = 2 * obs.bin_width
    assert lo == pytest.approx(float(torch.quantile(allx, 0.01)), abs=tol)
    assert hi == pytest.approx(float(torch.quantile(allx, 0.99)), abs=tol)


@settings(derandomize=True, max_examples=30, deadline=None)
@given(scales=st.lists(st.tuples(st.floats(-8, 6), st.floats(-100, 100), st.integers(1, 300)), min_size=1, max_size=6),
       method=st.sampled_from(["percentile", "mse", "entropy"]))
def test_histogram_growth_property(scales, method):
    obs = HistogramObserver(QuantSpec(observer=method), bins=64)
    g, total = _gen(16), 0
    for log_mag, shift, n in scales:
        x = torch.randn(n, generator=g) * 10.0**log_mag + shift
        obs(x)
        total += n
        assert float(obs.histogram.sum()) == total and obs.histogram.numel() == 64
        assert obs.hist_min <= min(float(obs.min_val), 0.0) and obs.hist_max >= max(float(obs.max_val), 0.0)
    qp = obs.calculate_qparams()
    assert bool(torch.isfinite(qp.scale)) and float(fake_quantize(torch.tensor(0.0), qp)) == 0.0


def _naive_kl(hist, hist_min, width, lo, hi, spec):
    """Per-bin TensorRT-style KL, written plainly, for one candidate."""
    qp = compute_qparams(torch.tensor(lo), torch.tensor(hi), spec)
    s, zp = float(qp.scale), int(qp.zero_point)
    n, total = hist.numel(), float(hist.sum())
    c = hist_min + (torch.arange(n, dtype=torch.float64) + 0.5) * width
    lvl = torch.round(c / s) + zp
    inside = (lvl >= spec.quant_min) & (lvl <= spec.quant_max)
    idx = inside.nonzero().flatten()
    f, last = int(idx[0]), int(idx[-1])
    sliced = hist * inside
    p = sliced.clone()
    p[f] += hist[:f].sum()
    p[last] += hist[last + 1:].sum()
    q = torch.zeros(n, dtype=torch.float64)
    for level in lvl[inside].unique():
        members = (lvl == level) & inside
        nz = members & (p > 0)
        if nz.any():
            q[nz] = sliced[members].sum() / nz.sum()
    q = q.clamp_min(1e-6 * total / n)
    m = p > 0
    return float((p[m] * torch.log(p[m] / q[m])).sum()) / total


@pytest.mark.parametrize("spec", [U8, S8, QuantSpec(dtype=torch.int8, bits=4), QuantSpec(dtype=torch.uint8, bits=3)],
                         ids=lambda s: s.describe())
def test_vectorised_kl_matches_naive(spec):
    g = _gen(17)
    hist = (torch.rand(512, generator=g, dtype=torch.float64) * 100).floor()
    hist[torch.rand(512, generator=g) < 0.2] = 0.0
    hist_min, width = -3.1234567, 0.0123456
    pairs = [(-3.0, 3.0), (-1.0, 2.5), (-2.9, 0.7), (-0.5, 3.2), (-3.2, 3.3)]
    lo = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    hi = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    fast = histogram_kl_costs(hist, hist_min, width, lo, hi, spec)
    for k, (a, b) in enumerate(pairs):
        if math.isfinite(float(fast[k])):
            assert float(fast[k]) == pytest.approx(_naive_kl(hist, hist_min, width, a, b, spec), rel=1e-6, abs=1e-9)
    assert bool(torch.isfinite(fast).any())


def test_mse_cost_model_tracks_real_error():
    x = _laplace(400_000, seed=18)
    obs = HistogramObserver(QuantSpec(observer="mse"))
    obs(x)
    spec = QuantSpec(dtype=torch.int8)
    lo = torch.tensor([-12.0, -8.0, -5.0, -3.0, -10.0], dtype=torch.float64)
    hi = torch.tensor([12.0, 8.0, 5.0, 3.0, 4.0], dtype=torch.float64)
    model = histogram_mse_costs(obs.histogram, obs.hist_min, obs.bin_width, lo, hi, spec) / x.numel()
    for k in range(len(lo)):
        real = _mse(x, compute_qparams(lo[k], hi[k], spec))
        assert float(model[k]) == pytest.approx(real, rel=0.1)


def test_histogram_all_zero_then_data():
    obs = HistogramObserver(QuantSpec(observer="mse"))
    obs(torch.zeros(10))
    qp = obs.calculate_qparams()
    assert float(qp.scale) == 1.0 and bool(torch.isfinite(qp.scale))
    obs(torch.linspace(-1, 1, 1001))
    assert float(obs.histogram.sum()) == 1011
    assert 0.5 < float(representable_range(obs.calculate_qparams())[1]) <= 1.01


@pytest.mark.parametrize("kind", ["percentile", "mse", "entropy"])
def test_histogram_low_precision_inputs(kind):
    x = torch.randn(1000, generator=_gen(8))
    for dt in (torch.float16, torch.bfloat16):
        obs = make_observer(QuantSpec(observer=kind))
        assert obs(x.to(dt)) is not None
        assert bool(torch.isfinite(obs.calculate_qparams().scale))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_minmax_axis(axis):
    torch.manual_seed(9)
    x = torch.randn(4, 3, 5, 6)
    spec = QuantSpec(dtype=torch.int8, symmetric=True, granularity="per_channel", axis=axis)
    obs = make_observer(spec)
    assert type(obs) is PerChannelMinMaxObserver
    qp = _calibrate(obs, *x.split(2, dim=2))
    dims = tuple(d for d in range(4) if d != axis % 4)
    assert torch.equal(obs.min_val, x.amin(dim=dims)) and torch.equal(obs.max_val, x.amax(dim=dims))
    assert qp.axis == axis and qp.scale.shape == (x.shape[axis],)
    amax = x.abs().amax(dim=dims)
    assert torch.allclose(qp.scale, amax / 127.5)


def test_moving_average_per_channel():
    spec = QuantSpec(granularity="per_channel", axis=0, observer="moving_average", averaging_constant=0.5)
    obs = make_observer(spec)
    assert isinstance(obs, MovingAveragePerChannelMinMaxObserver)
    _calibrate(obs, torch.tensor([[-1.0, 1.0], [0.0, 2.0]]), torch.tensor([[-3.0, 3.0], [0.0, 4.0]]))
    assert torch.equal(obs.max_val, torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("shape,axis", [((16, 8, 3, 3), 0), ((256, 2048), 0), ((8, 16), 1), ((5, 300), -1)])
def test_per_channel_mse(shape, axis):
    n_ch = shape[axis]
    w = _laplace(math.prod(shape), seed=10).reshape(shape)
    w = w * torch.linspace(0.1, 3.0, n_ch).reshape([-1 if d == axis % len(shape) else 1 for d in range(len(shape))])
    w.select(axis, 0).reshape(-1)[:1].fill_(0.0)
    spec = QuantSpec(dtype=torch.int8, bits=4, symmetric=True, granularity="per_channel", axis=axis,
                     observer="mse")
    obs = make_observer(spec)
    assert type(obs) is PerChannelMSEObserver
    qp = _calibrate(obs, w, w)
    mm = _calibrate(PerChannelMinMaxObserver(spec), w)
    assert qp.axis == axis and qp.scale.shape == (n_ch,)

    def per_channel_err(q):
        return ((fake_quantize(w, q) - w) ** 2).movedim(axis, 0).reshape(n_ch, -1).sum(1)

    err, err_mm = per_channel_err(qp), per_channel_err(mm)
    assert bool((err <= err_mm * (1 + 1e-6)).all())  # 1.0 is always a candidate
    per_ch = w.numel() // n_ch
    if per_ch >= 300:  # enough samples for a Laplacian tail to be worth clipping at 4 bits
        assert float(err.sum()) < 0.8 * float(err_mm.sum())
        assert bool((qp.scale < mm.scale).all())


def test_per_channel_mse_keeps_a_lone_outlier():
    w = torch.randn(4, 64, generator=_gen(14))
    w[2, 5] = 40.0  # clipping one huge weight costs far more than the rounding noise it saves
    spec = QuantSpec(dtype=torch.int8, symmetric=True, granularity="per_channel", axis=0, observer="mse")
    qp = _calibrate(make_observer(spec), w)
    assert float(fake_quantize(w, qp)[2, 5]) == pytest.approx(40.0, abs=float(qp.scale[2]))


def test_per_channel_mse_model_path_matches_exact_search(monkeypatch):
    w = _laplace(64 * 500, seed=15).reshape(64, 500)
    spec = QuantSpec(dtype=torch.int8, symmetric=True, granularity="per_channel", axis=0, observer="mse")
    exact = _calibrate(PerChannelMSEObserver(spec), w)
    monkeypatch.setattr(PerChannelMSEObserver, "exact_budget", 0)
    model = _calibrate(PerChannelMSEObserver(spec), w)
    err = ((fake_quantize(w, model) - w) ** 2).sum()
    err_exact = ((fake_quantize(w, exact) - w) ** 2).sum()
    assert float(err) <= 1.01 * float(err_exact)


def test_per_group_minmax():
    w = torch.randn(4, 20, generator=_gen(11))
    spec = QuantSpec(dtype=torch.int8, symmetric=True, granularity="per_group", group_size=8, observer="entropy")
    obs = make_observer(spec)
    assert type(obs) is PerGroupMinMaxObserver
    qp = _calibrate(obs, w)
    assert qp.scale.shape == (4, 3) and qp.group_size == 8
    padded = torch.nn.functional.pad(w, (0, 4)).reshape(4, 3, 8)
    assert torch.allclose(qp.scale, padded.abs().amax(-1) / 127.5)
    assert bool(((fake_quantize(w, qp) - w).abs() <= qp.scale.repeat_interleave(8, 1)[:, :20] / 2 + 1e-6).all())


def test_make_observer_mapping():
    assert type(make_observer(QuantSpec())) is MinMaxObserver
    assert type(make_observer(QuantSpec(observer="moving_average"))) is MovingAverageMinMaxObserver
    for kind in ("percentile", "mse", "entropy"):
        obs = make_observer(QuantSpec(observer=kind), name="x")
        assert type(obs) is HistogramObserver and obs.method == kind and obs.name == "x"
    for kind in ("percentile", "entropy", "minmax"):
        spec = QuantSpec(granularity="per_channel", axis=0, observer=kind)
        assert type(make_observer(spec)) is PerChannelMinMaxObserver
    with pytest.raises(ConfigError, match="per_token"):
        make_observer(QuantSpec(granularity="per_token"), name="tok")
    with pytest.raises(ConfigError):
        MinMaxObserver(QuantSpec(granularity="per_channel", axis=0))


ALL_SPECS = [QuantSpec(observer=k) for k in ("minmax", "moving_average", "percentile", "mse", "entropy")] + [
    QuantSpec(granularity="per_channel", axis=1, observer="minmax"),
    QuantSpec(granularity="per_channel", axis=1, observer="moving_average"),
    QuantSpec(granularity="per_channel", axis=1, observer="mse"),
    QuantSpec(granularity="per_group", group_size=2)]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.describe())
def test_errors_name_the_observer(spec):
    obs = make_observer(spec)
    obs.name = "layer3.conv2"
    with pytest.raises(CalibrationError, match="no calibration data reached 'layer3.conv2'"):
        obs.calculate_qparams()
    good = torch.randn(2, 4, generator=_gen(12))
    obs(good)
    before = obs.calculate_qparams()
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = good.clone()
        x[1, 2] = bad
        with pytest.raises(CalibrationError, match="NaN/Inf at 'layer3.conv2'"):
            obs(x)
    with pytest.raises(CalibrationError, match="empty tensor.*'layer3.conv2'"):
        obs(torch.empty(0, 4))
    assert obs.num_batches == 1
    after = obs.calculate_qparams()
    assert torch.equal(before.scale, after.scale) and torch.equal(before.zero_point, after.zero_point)
    assert "layer3.conv2" in repr(obs)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.lin(x))


def test_observer_inside_fx_graph_module():
    torch.manual_seed(13)
    gm = torch.fx.symbolic_trace(_Net())
    gm.add_submodule("obs_lin", make_observer(QuantSpec(observer="mse"), name="lin"))
    lin = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "lin")
    with gm.graph.inserting_after(lin):
        obs_node = gm.graph.call_module("obs_lin", (lin,))
    lin.replace_all_uses_with(obs_node, delete_user_cb=lambda user: user is not obs_node)
    gm.recompile()
    ref = _Net()
    ref.load_state_dict(gm.state_dict(), strict=False)
    xs = [torch.randn(8, 4) for _ in range(3)]
    with torch.no_grad():
        outs = [gm(x) for x in xs]
    assert all(torch.equal(o, ref(x)) for o, x in zip(outs, xs))
    assert gm.obs_lin.num_batches == 3
    pre = torch.cat([ref.lin(x) for x in xs]).detach()
    assert float(gm.obs_lin.min_val) == float(pre.min())
    assert isinstance(gm.obs_lin, Observer) and gm.obs_lin.calculate_qparams().scale > 0


def test_observers_do_not_track_grad_and_return_input():
    x = torch.randn(3, 4, requires_grad=True)
    for spec in ALL_SPECS:
        obs = make_observer(spec)
        y = obs(x)
        assert y is x
        stats = [b for b in obs.buffers() if b is not None]
        assert stats and not any(b.requires_grad for b in stats)


def test_per_group_mse_search_beats_minmax_and_keeps_group_shape():
    """observer="mse" on group-wise weights searches each group's range (it used to be min/max silently)."""
    from qcompile.observers import PerGroupMSEObserver, make_observer
    from qcompile.qparams import fake_quantize
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 200, generator=g)  # ragged: 200 = 3 groups of 64 + 8
    errs = {}
    for obs in ("minmax", "mse"):
        spec = QuantSpec(dtype=torch.uint8, bits=4, symmetric=False, granularity="per_group", group_size=64,
                         observer=obs)
        o = make_observer(spec)
        o(w)
        qp = o.calculate_qparams()
        assert tuple(qp.scale.shape) == (48, 4) and qp.group_size == 64
        errs[obs] = float((fake_quantize(w, qp) - w).square().mean())
    assert isinstance(make_observer(QuantSpec(dtype=torch.int8, bits=4, granularity="per_group", group_size=64,
                                              observer="mse")), PerGroupMSEObserver)
    assert errs["mse"] < 0.95 * errs["minmax"]  # 0.927 measured


def test_pair_sum_observer_bounds_every_same_sign_pair_and_beats_7bit_codes():
    from qcompile.observers import PerChannelPairSumObserver
    from qcompile.specs import QuantSpec
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 1, 3, 3, generator=g) * 0.1
    w[:, 0, 1, 1] = torch.where(torch.arange(32) % 2 == 0, 1.0, -1.0)  # a dominant centre tap of either sign
    w[5] = 0.0  # a dead channel
    w[6, 0, 0, 0], w[6, 0, 1, 1] = 1.0, 1.0  # two equal largest taps: nothing finer than 7 bits is safe
    spec = QuantSpec(dtype=torch.int8, bits=8, symmetric=True, granularity="per_channel", axis=0, observer="pair_sum")
    obs = make_observer(spec)
    assert isinstance(obs, PerChannelPairSumObserver)
    obs(w)
    qp = obs.calculate_qparams()
    s = qp.scale.view(-1, 1, 1, 1)
    q = torch.round(w / s).clamp(-128, 127).flatten(1)
    pair = torch.maximum(q.clamp(min=0).topk(2, 1).values.sum(1), (-q).clamp(min=0).topk(2, 1).values.sum(1))
    assert int(pair.max()) <= 128 and int(pair[6]) == 128  # 63.5 + 63.5 both round up: the allowance used
    assert torch.equal((q.flatten(1) * s.flatten(0)[:, None]).reshape_as(w)[5], w[5])  # the dead channel stays 0
    s7 = (w.abs().flatten(1).amax(1) / 63.5).clamp_min(1e-12).view(-1, 1, 1, 1)
    err = lambda sc: (torch.round(w / sc) * sc - w).pow(2).flatten(1).sum(1)  # noqa: E731
    live = [i for i in range(32) if i not in (5, 6)]
    assert float(err(s)[live].sum()) < 0.5 * float(err(s7)[live].sum())  # > 3 dB finer on dominant-tap filters
    with pytest.raises(ConfigError, match="pair_sum"):
        make_observer(QuantSpec(dtype=torch.uint8, granularity="per_channel", axis=0, observer="pair_sum"))
