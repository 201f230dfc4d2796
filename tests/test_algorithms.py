"""Accuracy algorithms on small models where their effect is known exactly."""
import math

import pytest
import torch
from torch import nn

import qcompile
from qcompile import WeightSpec
from qcompile.errors import ConfigError
from qcompile.passes.calibration_stats import collect, runner
from qcompile.passes.equalize import CrossLayerEqualization, _ranges, find_pairs, stats_nodes
from qcompile.qparams import sqnr


def _prepared(model, x):
    return qcompile.prepare(model, (x,), backend="x86")


def _two_convs(act=nn.ReLU, pad=1):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act(), nn.Conv2d(8, 6, 3, padding=pad)).eval()
    with torch.no_grad():
        m[0].weight[:4] *= 30  # four wide channels
        m[0].bias.uniform_(-0.5, 0.5)
    return m


def test_cle_equalizes_per_channel_ranges_exactly_and_keeps_the_float_output():
    m, x = _two_convs(), torch.randn(2, 3, 12, 12)
    gm = _prepared(m, x).gm
    ref = runner(gm)(x)
    (pair,) = find_pairs(gm)
    r1, r2 = _ranges(gm, pair)
    assert float((r1 / r2).max() / (r1 / r2).min()) > 30
    CrossLayerEqualization(iterations=1)(gm)
    r1, r2 = _ranges(gm, pair)
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=0)  # sqrt(r1 r2) on both sides
    torch.testing.assert_close(runner(gm)(x), ref, rtol=1e-5, atol=1e-5)


def test_cle_chains_conv_depthwise_conv_and_keeps_the_float_output():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                      nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        m[2].weight[::2] *= 50
    x = torch.randn(2, 3, 10, 10)
    gm = _prepared(m, x).gm
    ref = runner(gm)(x)
    assert [(p.kind, len(p.second.args) > 6) for p in find_pairs(gm)] == [("relu", True), ("relu", False)]
    spread = lambda: max(float((a / b).max() / (a / b).min()) for a, b in (_ranges(gm, p) for p in find_pairs(gm)))  # noqa: E731
    before = spread()
    CrossLayerEqualization(iterations=20)(gm)
    assert spread() < 1.05 < before / 10
    torch.testing.assert_close(runner(gm)(x), ref, rtol=1e-5, atol=1e-5)


def test_cle_through_relu6_keeps_the_output_on_calibration_data_and_needs_statistics():
    m = _two_convs(nn.ReLU6)
    with torch.no_grad():
        m[0].weight[4:] *= 0.02  # channels that never reach the clip: free to scale
    xs = [torch.randn(2, 3, 12, 12) for _ in range(3)]
    gm = _prepared(m, xs[0]).gm
    ref = [runner(gm)(x) for x in xs]
    CrossLayerEqualization()(gm)  # no statistics: the ReLU6 pair is skipped and reported
    assert gm.meta["qcompile_equalization"]["skipped"][0]["reason"].startswith("ReLU6")
    stats = collect(gm, stats_nodes(gm), [((x,), {}) for x in xs])
    CrossLayerEqualization(stats)(gm)
    rep = gm.meta["qcompile_equalization"]["pairs"][0]
    assert rep["activation"] == "relu6" and rep["scale_min"] < 0.2  # small channels scaled up toward the clip
    for x, r in zip(xs, ref):
        torch.testing.assert_close(runner(gm)(x), r, rtol=1e-5, atol=1e-5)


def test_high_bias_absorption_moves_bias_into_the_next_layer_exactly():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        m[0].bias.fill_(5.0)  # pre-activations always > 0 on this data
    xs = [torch.randn(2, 3, 6, 6) * 0.3 for _ in range(2)]
    gm = _prepared(m, xs[0]).gm
    ref = runner(gm)(xs[1])
    CrossLayerEqualization(collect(gm, stats_nodes(gm), [((x,), {}) for x in xs]))(gm)
    assert gm.meta["qcompile_equalization"]["pairs"][0]["bias_absorbed_channels"] == 8
    torch.testing.assert_close(runner(gm)(xs[1]), ref, rtol=1e-4, atol=1e-4)


def test_bias_correction_removes_the_mean_output_shift():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32)).eval()
    cal = [torch.randn(16, 64) + 2.0 for _ in range(8)]  # non-zero input mean: rounding shifts the output
    kw = dict(backend="x86", calibration=cal, weights=WeightSpec(bits=4), verify=False)
    plain = qcompile.compile(m, (cal[0],), algorithm=[], **kw)
    corrected = qcompile.compile(m, (cal[0],), algorithm=["bias_correction"], **kw)
    x = torch.cat(cal)
    with torch.no_grad():
        shift = lambda art: (art(x) - m(x)).mean(0).abs().max().item()  # noqa: E731
        assert shift(plain) > 0.05
        assert shift(corrected) < 0.1 * shift(plain)
    assert corrected.report.algorithms["bias_correction"]["corrected_layers"] == 1


def test_learned_rounding_lowers_the_layer_reconstruction_error_below_round_to_nearest():
    from qcompile.passes.adaround import AdaRoundConfig, adaround_weight
    from qcompile.passes.convert import weight_qparams
    from qcompile.specs import QuantSpec
    torch.manual_seed(0)
    w = torch.randn(32, 64) * 0.1
    basis = torch.randn(8, 64)
    x = torch.randn(2048, 8) @ basis + 0.1 * torch.randn(2048, 64)
    spec = QuantSpec(torch.int8, 4, True, granularity="per_channel", axis=0)
    qp = weight_qparams(w, spec)
    q, _ = adaround_weight(w, (x.T @ x / len(x))[None], qp, AdaRoundConfig(iterations=300))
    rtn = (torch.clamp(torch.round(w / qp.scale[:, None]), qp.quant_min, qp.quant_max)) * qp.scale[:, None]
    err = lambda wq: float(((x @ (w - wq).T) ** 2).mean())  # noqa: E731
    assert err(q) < 0.7 * err(rtn)
    codes = q / qp.scale[:, None]
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)  # on the grid


def test_greedy_rounding_descends_the_output_error_and_stays_on_the_grid():
    """Smooth inputs (each input channel's 9 taps see nearly the same value, as an image stem's do): the
    output sees the sum of a kernel's rounding errors, which round-to-nearest leaves to chance."""
    from qcompile.passes.adaround import greedy_weight
    from qcompile.passes.convert import weight_qparams
    from qcompile.specs import QuantSpec
    torch.manual_seed(0)
    w = torch.randn(32, 27)
    x = torch.randn(4000, 3, 1).expand(4000, 3, 9).reshape(4000, 27) + 0.1 * torch.randn(4000, 27)
    spec = QuantSpec(torch.int8, 8, True, granularity="per_channel", axis=0)
    qp = weight_qparams(w, spec)
    q, info = greedy_weight(w, (x.T @ x)[None], qp)
    s = qp.scale[:, None]
    rtn = torch.clamp(torch.round(w / s), qp.quant_min, qp.quant_max) * s
    err = lambda wq: float(((x @ (w - wq).T) ** 2).mean())  # noqa: E731
    assert err(q) < 0.2 * err(rtn) and info["flips"] > 0  # 133 -> 14 measured
    torch.testing.assert_close(q / s, (q / s).round(), rtol=0, atol=1e-4)  # on the grid
    assert float(((q - rtn) / s).abs().max()) <= 1.0 + 1e-4  # each weight to its other neighbour at most
    white = torch.randn(4000, 27)
    qw, _ = greedy_weight(w, (white.T @ white)[None], qp)
    err_w = lambda wq: float(((white @ (w - wq).T) ** 2).mean())  # noqa: E731
    assert err_w(qw) <= err_w(rtn)  # steepest descent from round-to-nearest: never above it on its own rows


def _greedy_spec(w, hs, qp, max_flips):
    """greedy_weight's search written plainly (symmetric objective, per-channel symmetric grid): the best flip
    of every row per step, each weight at most once, while it lowers tr(D H D^T)."""
    s = qp.scale[:, None]
    v = w / s
    q = torch.clamp(torch.round(v), qp.quant_min, qp.quant_max)
    d = (v - q)[None]
    q = q[None].clone()
    t = torch.sign(d)
    ok = (t != 0) & (q + t >= qp.quant_min) & (q + t <= qp.quant_max)
    grad = torch.einsum("grk,gkl->grl", d, hs)
    diag = torch.diagonal(hs, dim1=1, dim2=2)[:, None, :]
    gi = torch.zeros(1, w.shape[0], dtype=torch.long)
    for _ in range(min(max_flips, w.shape[1])):
        delta = torch.where(ok, -2 * t * grad + diag, torch.full_like(grad, float("inf")))
        best, k = delta.min(dim=2)
        move = best < -1e-9 * (d * grad).sum(2).abs().clamp_min(1e-30)
        if not bool(move.any()):
            break
        tk = torch.where(move, torch.gather(t, 2, k[..., None])[..., 0], torch.zeros_like(best))
        d.scatter_add_(2, k[..., None], -tk[..., None])
        q.scatter_add_(2, k[..., None], tk[..., None])
        grad -= tk[..., None] * hs[gi, k]
        ok.scatter_(2, k[..., None], ok.gather(2, k[..., None]) & ~move[..., None])
    return q[0] * s


@pytest.mark.parametrize("n,k,flips", [(16, 27, 512), (40, 300, 64), (8, 9, 3)])
def test_greedy_rounding_takes_the_same_steps_as_its_plain_statement(n, k, flips):
    """The fused step (one addcmul per step for the flip gains, the finished weights masked out in place) picks
    the same flips as the search written plainly: the same bits."""
    from qcompile.passes.adaround import greedy_weight
    from qcompile.passes.convert import weight_qparams
    from qcompile.specs import QuantSpec
    torch.manual_seed(n + k)
    w = torch.randn(n, k) * torch.rand(n, 1)
    x = torch.randn(2000, k) @ (torch.eye(k) + 0.3 * torch.randn(k, k))
    hs = (x.T @ x / 2000)[None]
    qp = weight_qparams(w, QuantSpec(torch.int8, 8, True, granularity="per_channel", axis=0))
    q, info = greedy_weight(w, hs, qp, flips)
    assert info["flips"] > 0
    assert torch.equal(q, _greedy_spec(w.float(), hs, qp, flips))


def test_upstream_objective_is_the_error_against_the_float_layer_and_greedy_lowers_it():
    """Hessian.add(x, ref=x_float) streams the cross term: quadratic_error is then exactly the mean
    |Q x - W x_float|^2, and greedy rounding on it compensates part of an upstream error (here a per-channel
    gain left by earlier layers) that the symmetric objective cannot see."""
    from qcompile.gptq import Hessian, quadratic_error
    from qcompile.passes.adaround import greedy_weight
    from qcompile.passes.convert import weight_qparams
    from qcompile.specs import QuantSpec
    torch.manual_seed(0)
    xf = torch.randn(3000, 4) @ torch.randn(4, 48) + 0.2 * torch.randn(3000, 48)
    xp = xf * (1 + 0.04 * torch.randn(48))  # the rounded graph's input: each channel off by a gain
    w = torch.randn(16, 48)
    spec = QuantSpec(torch.int8, 4, True, granularity="per_channel", axis=0)
    qp = weight_qparams(w, spec)
    h = Hessian(48)
    h.add(xp[:1000], ref=xf[:1000])
    h.add(xp[1000:], ref=xf[1000:])
    s = qp.scale[:, None]
    rtn = torch.clamp(torch.round(w / s), qp.quant_min, qp.quant_max) * s
    err = lambda q: float(((xp @ q.T - xf @ w.T) ** 2).sum() / len(xf))  # noqa: E731
    got, energy = quadratic_error(w, rtn, h)
    assert got == pytest.approx(err(rtn), rel=1e-4)
    assert energy == pytest.approx(float((xf @ w.T).pow(2).sum()) / 3000, rel=1e-4)
    c, _ = h.cross_matrices()
    q_sym, _ = greedy_weight(w, h.matrices().float(), qp)
    q_up, _ = greedy_weight(w, h.matrices().float(), qp, cs=c.float())
    assert quadratic_error(w, q_up, h)[0] == pytest.approx(err(q_up), rel=1e-4)
    assert err(q_up) < 0.8 * min(err(q_sym), err(rtn))
    torch.testing.assert_close(q_up / s, (q_up / s).round(), rtol=0, atol=1e-4)  # on the grid


def test_greedy_rounding_upstream_sees_the_float_input_of_each_layer():
    """GreedyRoundingConfig(upstream=True): the first layer's float input is the rounded graph's input (the
    cross term equals the Hessian); a later layer's differs by the earlier layers' rounding."""
    from qcompile.passes.adaround import GreedyRounding, GreedyRoundingConfig
    from qcompile.passes.weight_only import rounds, weighted_layers
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 3, 10, 10)
    gm = qcompile.prepare(m, (x,), backend="x86", weights=WeightSpec(bits=4)).gm
    samples = [((torch.randn(2, 3, 10, 10),), {}) for _ in range(4)]
    seen = {}

    class Spy(GreedyRounding):
        def _collect(self, runner, group, samples, reference=None):
            out = super()._collect(runner, group, samples, reference)
            seen.update({layer.name: out[layer.tap_key] for layer in group})
            return out
    stats = Spy(GreedyRoundingConfig(upstream=True))(gm, samples)
    first, second = (lay.name for lay in weighted_layers(gm))
    assert len(rounds(gm, weighted_layers(gm))) == 2 and all(stats[n]["calibration_rows"] > 0 for n in (first, second))
    for name, same in ((first, True), (second, False)):
        c, f = seen[name].cross_matrices()
        h = seen[name].matrices()
        assert torch.allclose(c, h) is same and torch.allclose(f, h) is same


def test_greedy_rounding_in_compile_beats_round_to_nearest_on_image_like_inputs():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()

    def smooth(n):  # images: neighbouring pixels alike
        return nn.functional.interpolate(torch.randn(n, 3, 4, 4), size=(16, 16), mode="bilinear", align_corners=False)
    cal, t = [smooth(4) for _ in range(8)], smooth(8)
    kw = dict(backend="x86", calibration=cal, verify=False, progress=False, weights=WeightSpec(bits=4))  # weights dominate
    rtn = qcompile.compile(m, (t,), algorithm="rtn", **kw)
    greedy = qcompile.compile(m, (t,), algorithm=["greedy_rounding"], **kw)
    rep = greedy.report.algorithms["greedy_rounding"]
    assert rep["layers"] == 3 and rep["kept"] >= 2  # kept where it won on the calibration half it did not fit
    from qcompile.passes.adaround import GreedyRoundingConfig
    up = qcompile.compile(m, (t,), algorithm=[GreedyRoundingConfig(upstream=True)], **kw)
    assert "float model" in up.report.algorithms["greedy_rounding"]["objective"]
    assert "objective" not in rep
    with torch.no_grad():
        assert sqnr(m(t), greedy(t)) > sqnr(m(t), rtn(t)) + 3
        assert sqnr(m(t), up(t)) > sqnr(m(t), rtn(t)) + 3  # 34.6 -> 47.4 (greedy), 47.0 (upstream) measured
    with pytest.raises(ConfigError, match="one weight rounding"):
        qcompile.compile(m, (t,), algorithm=["greedy_rounding", "gptq"], **kw)


def test_learned_rounding_never_breaks_the_x86_depthwise_pair_bound():
    from qcompile.gptq import breaks_pair_bound
    from qcompile.passes.convert import weight_qparams
    from qcompile.specs import QuantSpec
    spec = QuantSpec(torch.int8, 8, True, granularity="per_channel", axis=0, observer="pair_sum")
    w = torch.tensor([[0.5, 0.5, 0.1], [1.0, -0.2, 0.0]])
    qp = weight_qparams(w, spec)  # channel 0: two equal taps at 63.5 codes each
    s = qp.scale[:, None]
    assert not breaks_pair_bound(torch.round(w / s) * s, qp, spec)
    up = torch.ceil(w / s) * s
    up[0, 2] = torch.round(w[0, 2] / s[0, 0]) * s[0, 0]
    assert breaks_pair_bound(up + torch.tensor([[s[0, 0], 0.0, 0.0], [0.0, 0.0, 0.0]]), qp, spec)  # 65 + 64
    assert not breaks_pair_bound(up, qp, replace_observer(spec, "minmax"))  # only the pair_sum range is bound


def replace_observer(spec, observer):
    from dataclasses import replace
    return replace(spec, observer=observer)


@pytest.mark.slow
def test_recommended_algorithms_and_plain_ptq_by_default():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                      nn.ReLU(), nn.Conv2d(16, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(32, 10)).eval()
    cal, t = [torch.randn(4, 3, 16, 16) for _ in range(4)], torch.randn(8, 3, 16, 16)
    kw = dict(backend="x86", calibration=cal, weights=WeightSpec(bits=4), verify=False)
    off = qcompile.compile(m, (t,), algorithm="rtn", **kw)  # plain PTQ
    on = qcompile.compile(m, (t,), algorithm="recommended", **kw)
    assert set(on.report.algorithms) == {"equalize", "greedy_rounding", "bias_correction"} and not off.report.algorithms
    with torch.no_grad():
        assert sqnr(m(t), on(t)) > sqnr(m(t), off(t)) + 6  # 47.1 vs 28.6 dB measured
    w8 = qcompile.compile(m, (t,), backend="x86", calibration=cal, verify=False, algorithm=["recommended", "gptq"])
    assert set(w8.report.algorithms) == {"equalize", "gptq", "bias_correction"}  # no learned rounding at 8 bits


def test_algorithm_option_is_validated():
    m, x = nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4)
    with pytest.raises(ConfigError, match="algorithm"):
        qcompile.compile(m, (x,), backend="x86", calibration=[x], algorithm=["equalize", "magic"])
    with pytest.raises(ConfigError, match="one weight rounding"):
        qcompile.compile(m, (x,), backend="x86", calibration=[x], algorithm=["gptq", "adaround"])


def test_gptq_keeps_round_to_nearest_where_it_does_not_generalize():
    from qcompile.gptq import FoldedHessian, gptq_or_rtn
    from qcompile.specs import QuantSpec
    torch.manual_seed(0)
    w = torch.randn(16, 64) * 0.1
    h = FoldedHessian(64)
    a, b = torch.randn(4, 64), torch.randn(4, 64)  # two tiny, unrelated folds: GPTQ overfits each
    h.add(a, 0)
    h.add(b, 1)
    spec = QuantSpec(torch.int8, 8, True, granularity="per_channel", axis=0)
    q, params, st = gptq_or_rtn(w, h, spec)
    assert st["heldout_rel_error"] >= st["heldout_rtn_rel_error"]
    assert st["algorithm"] == "rtn" and params is None and "kept round-to-nearest" in st["reason"]
    assert math.isclose(st["rel_error"], st["rtn_rel_error"])


def test_analytic_clipped_normal_mean_matches_monte_carlo():
    from qcompile.passes.bias_correction import clipped_normal_mean
    torch.manual_seed(0)
    mu, sigma = torch.tensor([-1.0, 0.5, 3.0, 7.0], dtype=torch.float64), torch.tensor([1.0, 2.0, 2.5, 1.0], dtype=torch.float64)
    z = mu + sigma * torch.randn(400_000, 4, dtype=torch.float64)
    torch.testing.assert_close(clipped_normal_mean(mu, sigma), z.clamp_min(0).mean(0), rtol=0, atol=0.01)
    torch.testing.assert_close(clipped_normal_mean(mu, sigma, 0.0, 6.0), z.clamp(0, 6).mean(0), rtol=0, atol=0.01)


class _OutlierBlock(nn.Module):
    """Pre-LN and post-LN linear groups whose LayerNorm output has a few channels 30x the rest."""

    def __init__(self, d=32):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.fc = nn.Linear(d, d)
        with torch.no_grad():
            for ln in (self.ln1, self.ln2):
                ln.weight[:3] = 30.0

    def forward(self, x):
        h = self.ln1(x)
        h = self.q(h) * torch.sigmoid(self.k(h))   # ln1 feeds only linears: folded, no run-time op
        r = self.ln2(h)
        return self.fc(r) + r                        # ln2 also feeds the residual: one float mul restores it


def test_smoothquant_keeps_the_float_output_and_beats_plain_ptq_on_outlier_channels():
    from qcompile.passes.smoothquant import SMOOTHQUANT, SmoothQuant
    torch.manual_seed(0)
    m = _OutlierBlock().eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(4, 16, 32, generator=g) for _ in range(4)]
    prepared = _prepared(m, cal[0])
    run_before = runner(prepared.gm)
    with torch.no_grad():
        before = run_before(cal[0])
        assert SmoothQuant([((x,), {}) for x in cal])(prepared.gm).modified
        after = runner(prepared.gm)(cal[0])
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    rep = prepared.gm.meta[SMOOTHQUANT]
    assert [len(g_["linears"]) for g_ in rep["groups"]] == [2, 1]
    assert [g_["residual_muls"] for g_ in rep["groups"]] == [0, 1] and all(g_["alpha"] > 0 for g_ in rep["groups"])
    kw = dict(backend="x86", calibration=cal)
    plain, smooth = qcompile.compile(m, (cal[0],), **kw), qcompile.compile(m, (cal[0],), algorithm="smoothquant", **kw)
    t = torch.randn(4, 16, 32, generator=g)
    with torch.no_grad():
        assert sqnr(m(t), smooth(t)) > sqnr(m(t), plain(t)) + 3
    assert smooth.report.algorithms["smoothquant"]["residual_muls"] == 1
    muls = [r for r in smooth.report.rows if "SmoothQuant" in r.reason]
    assert len(muls) == 1 and muls[0].status.startswith("float")


def test_smoothquant_gain_holds_on_onnx_runtime():
    """The algorithm changes the reference graph only: ONNX Runtime runs the smoothed model too."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = _OutlierBlock().eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(4, 16, 32, generator=g) for _ in range(4)]
    kw = dict(backend="onnx", calibration=cal)
    plain, smooth = qcompile.compile(m, (cal[0],), **kw), qcompile.compile(m, (cal[0],), algorithm="smoothquant", **kw)
    with torch.no_grad():
        assert sqnr(m(cal[1]), smooth(cal[1])) > sqnr(m(cal[1]), plain(cal[1])) + 3
    assert smooth.report.verify["within_one_step"] >= 0.99


def test_bias_correction_is_the_static_default_and_rtn_turns_it_off():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    cal, t = [torch.randn(8, 16) + 1.0 for _ in range(6)], torch.randn(8, 16) + 1.0
    kw = dict(backend="x86", calibration=cal, verify=False)
    default = qcompile.compile(m, (t,), **kw)
    assert default.report.algorithms == {"bias_correction": {"corrected_layers": 2},
                                         "greedy_rounding": {"layers": 2, "kept": 2, "round_to_nearest": 0}}
    few = qcompile.compile(m, (t,), backend="x86", calibration=cal[:5], verify=False)  # too few for the default
    assert "5 calibration samples" in few.report.algorithms["bias_correction"]["skipped"]
    assert few.report.algorithms["greedy_rounding"]["layers"] == 2  # two samples are enough for greedy rounding
    one = qcompile.compile(m, (t,), backend="x86", calibration=cal[:1], verify=False)
    assert "1 calibration sample;" in one.report.algorithms["greedy_rounding"]["skipped"]
    forced = qcompile.compile(m, (t,), backend="x86", calibration=cal[:5], verify=False, algorithm="bias_correction")
    assert forced.report.algorithms == {"bias_correction": {"corrected_layers": 2}}
    assert not qcompile.compile(m, (t,), algorithm="rtn", **kw).report.algorithms
    assert not qcompile.compile(m, (t,), algorithm=[], **kw).report.algorithms
    assert not qcompile.compile(m, (t,), backend="x86", mode="dynamic", verify=False).report.algorithms
    from qcompile.algorithms import resolve
    # exact input is a default too; it does nothing unless the inputs lie on an 8-bit pixel lattice (the report
    # above has no entry for it: these inputs do not)
    assert list(resolve(None, "static", 4)) == ["exact_input", "greedy_rounding", "bias_correction"]
    assert list(resolve(None, "static", 8)) == ["exact_input", "greedy_rounding", "bias_correction"]
    assert resolve(None, "static", 8)["greedy_rounding"].max_samples == 8  # a bounded compile time
    assert resolve(None, "static", 4)["greedy_rounding"] is None           # every sample
    assert list(resolve("recommended", "static", 8)) == ["exact_input", "equalize", "greedy_rounding",
                                                         "bias_correction"]


def test_prepare_then_calibrate_runs_the_same_defaults_as_compile():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    cal, t = [torch.randn(8, 16) + 1.0 for _ in range(6)], torch.randn(8, 16) + 1.0
    one_call = qcompile.compile(m, (t,), backend="x86", calibration=cal, verify=False)
    steps = qcompile.convert(qcompile.prepare(m, (t,), backend="x86").calibrate(iter(cal)), verify=False)
    assert steps.report.algorithms == one_call.report.algorithms == {
        "bias_correction": {"corrected_layers": 2}, "greedy_rounding": {"layers": 2, "kept": 2, "round_to_nearest": 0}}
    with torch.no_grad():
        assert torch.equal(steps(t), one_call(t))
    manual = qcompile.prepare(m, (t,), backend="x86")
    for s in cal:
        manual(s)  # calling the prepared model only calibrates
    assert not qcompile.convert(manual, verify=False).report.algorithms
    with pytest.raises(qcompile.CalibrationError, match="empty"):
        qcompile.prepare(m, (t,), backend="x86").calibrate([])


class _ChannelsLastMLP(nn.Module):
    """ConvNeXt's block shape: a conv, then linears over the channels of an NHWC tensor."""

    def __init__(self):
        super().__init__()
        self.conv, self.up, self.down = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        return self.down(torch.relu(self.up(y))).permute(0, 3, 1, 2)


def test_bias_correction_and_equalization_read_a_4d_linear_input_by_its_last_dim():
    torch.manual_seed(0)
    m = _ChannelsLastMLP().eval()
    cal, t = [torch.randn(2, 3, 8, 8) + 0.5 for _ in range(4)], torch.randn(2, 3, 8, 8) + 0.5
    kw = dict(backend="x86", calibration=cal, verify=False, weights=WeightSpec(bits=4), quantize_outputs=False)
    plain = qcompile.compile(m, (t,), algorithm="rtn", **kw)
    corrected = qcompile.compile(m, (t,), algorithm="bias_correction", **kw)
    assert corrected.report.algorithms["bias_correction"]["corrected_layers"] == 3
    with torch.no_grad():
        ref = m(t)
        shift = lambda a: float((a.run_reference(t) - ref).mean((0, 2, 3)).abs().mean())  # noqa: E731
        assert shift(corrected) < 0.5 * shift(plain)
    eq = qcompile.compile(m, (t,), algorithm="equalize", **kw)
    assert eq.report.algorithms["equalize"]["pairs"] == 1  # up -> relu -> down


def _weight_ranges(art) -> dict:
    """{module path: (quant_min, quant_max)} of each conv / linear weight in the reference graph."""
    from qcompile.ir import module_path
    out = {}
    for n in art.reference.graph.nodes:
        if n.op == "call_function" and n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            dq = n.args[1]
            if isinstance(dq, torch.fx.Node) and "dequantize" in str(dq.target):
                out[module_path(n)] = tuple(int(v) for v in dq.args[-3:-1])
    return out


def test_low_bit_weights_keep_8_bits_in_the_first_and_depthwise_convs():
    """WeightSpec(bits=4): the stem conv and the depthwise conv keep 8-bit weights (sensitive_bits), named in
    the report; sensitive_bits=None and a per-module config override it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                      nn.ReLU(), nn.Conv2d(16, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(32, 10)).eval()
    cal, t = [torch.randn(4, 3, 16, 16) for _ in range(4)], torch.randn(8, 3, 16, 16)
    kw = dict(backend="x86", calibration=cal, verify=False, algorithm="rtn")
    art = qcompile.compile(m, (t,), weights=WeightSpec(bits=4), **kw)
    ranges = _weight_ranges(art)
    assert set(ranges) == {"0", "2", "4", "8"}
    # wider than 4 bits: 8 on VNNI CPUs, the x86 backend's 7-bit cap on AVX2-only ones
    assert ranges["0"][1] - ranges["0"][0] >= 126 and ranges["2"][1] - ranges["2"][0] >= 126, ranges
    assert ranges["4"] == ranges["8"] == (-8, 7), ranges
    reasons = {r.module: r.reason for r in art.report.rows if r.op == "conv2d"}
    assert "first layer" in reasons["0"] and "depthwise" in reasons["2"] and "kept at 8 bits" not in reasons["4"]
    flat = qcompile.compile(m, (t,), weights=WeightSpec(bits=4, sensitive_bits=None), **kw)
    assert set(_weight_ranges(flat).values()) == {(-8, 7)}
    own = qcompile.compile(m, (t,), config=qcompile.QConfig(weights=WeightSpec(bits=4), module_names={
        "2": qcompile.ModuleConfig(weights=WeightSpec(bits=4))}), **kw)
    assert _weight_ranges(own)["2"] == (-8, 7) and _weight_ranges(own)["0"] != (-8, 7)  # the user's choice wins
    with pytest.raises(ValueError, match="sensitive_bits"):
        WeightSpec(bits=4, sensitive_bits=12)


def test_low_bit_per_channel_weights_choose_their_scale_by_mse():
    """WeightSpec's observer default: "mse" for per-channel integer weights of <= 4 bits (the 16-level grid
    stretched to the largest weight wastes most levels), "minmax" otherwise; an explicit choice is kept, and the
    layers sensitive_bits widens get the default of their own bits."""
    from dataclasses import replace
    assert WeightSpec(bits=4).observer == "mse" and WeightSpec(bits=3).observer == "mse"
    assert WeightSpec().observer == WeightSpec(bits=4, group_size=128).observer == "minmax"
    assert WeightSpec(dtype="nf4").observer == WeightSpec(bits=4, granularity="per_tensor").observer == "minmax"
    assert WeightSpec(bits=4, observer="minmax").observer == "minmax"
    assert replace(WeightSpec(bits=4), bits=8, observer=None).observer == "minmax"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2048, 64)).eval()
    with torch.no_grad():  # trained weights are heavy-tailed: min/max spends the 16 levels on a few large ones
        m[0].weight.copy_(torch.distributions.Laplace(0.0, 0.05).sample((64, 2048)))
    x = torch.randn(32, 2048)
    kw = dict(backend="x86", calibration=[x], verify=False, algorithm="rtn")
    mse = qcompile.compile(m, (x,), weights=WeightSpec(bits=4), **kw)
    mm = qcompile.compile(m, (x,), weights=WeightSpec(bits=4, observer="minmax"), **kw)
    with torch.no_grad():
        assert sqnr(m(x), mse(x)) > sqnr(m(x), mm(x)) + 2  # 16.2 vs 13.1 dB measured
