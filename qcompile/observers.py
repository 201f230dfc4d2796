"""Calibration observers.

Every observer is an ``nn.Module`` whose ``forward(x)`` returns ``x`` unchanged (so it can sit in a
``torch.fx.GraphModule`` as a ``call_module`` node) and folds statistics of ``x`` into a bounded
state. ``calculate_qparams()`` turns the statistics into ``QParams`` via
``qcompile.qparams.compute_qparams``.

Set ``observer.name`` (graph node name / module path) so errors say where calibration went wrong.

Which observer ``make_observer`` builds for a ``QuantSpec``:

============  =======================================================================
per_tensor    minmax -> MinMaxObserver, moving_average -> MovingAverageMinMaxObserver, unit_scale -> UnitScaleObserver,
              percentile / mse / entropy / auto -> HistogramObserver(method=spec.observer) ("auto": the
              method is chosen per tensor after calibration by qcompile.passes.range_choice; "mse" until then)
per_channel   mse / auto -> PerChannelMSEObserver, pair_sum -> PerChannelPairSumObserver, moving_average ->
              MovingAveragePerChannelMinMaxObserver, percentile / entropy / minmax ->
              PerChannelMinMaxObserver (a histogram per channel is not worth its memory)
per_group     mse -> PerGroupMSEObserver, anything else -> PerGroupMinMaxObserver (weights only)
per_token     ConfigError: per-token activations are quantized dynamically, nothing to calibrate
============  =======================================================================
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .errors import CalibrationError, ConfigError
from .qparams import compute_qparams, fake_quantize, reduce_minmax, representable_range
from .specs import QParams, QuantSpec

__all__ = [
    "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver",
    "PerChannelMinMaxObserver", "MovingAveragePerChannelMinMaxObserver", "PerChannelMSEObserver",
    "PerChannelPairSumObserver", "UnitScaleObserver",
    "PerGroupMinMaxObserver", "PerGroupMSEObserver", "make_observer", "histogram_percentile_range", "histogram_mse_range",
    "histogram_entropy_range", "histogram_mse_costs", "histogram_kl_costs",
]

HISTOGRAM_METHODS = ("percentile", "mse", "entropy", "auto")
RANGE_METHODS = ("mse", "minmax", "percentile", "entropy")  # what "auto" chooses among (the first until chosen)
_MIN_BIN_WIDTH = 1e-12


def _shrink_factors() -> Tensor:
    """~180 range fractions: fine steps near 1 (flat optimum), geometric steps down to 1e-3."""
    fine = torch.linspace(1.0, 0.5, 101, dtype=torch.float64)
    coarse = torch.logspace(math.log10(0.5), -3.0, 80, dtype=torch.float64)[1:]
    return torch.cat([fine, coarse])


class Observer(nn.Module):
    """Base class: validation, batch counting, error messages. Subclasses implement
    ``_observe(x: float32 Tensor)`` and ``_calculate() -> QParams``."""

    granularities: tuple[str, ...] = ("per_tensor",)

    def __init__(self, spec: QuantSpec, name: str = "<unnamed>"):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise ConfigError(f"{type(self).__name__} needs a QuantSpec, got {type(spec).__name__}")
        if spec.granularity not in self.granularities:
            raise ConfigError(f"{type(self).__name__} handles {self.granularities} specs, "
                              f"got {spec.granularity!r}; use make_observer(spec)")
        self.spec = spec
        self.name = name
        self.num_batches = 0

    _replay = None  # qcompile.passes.range_choice: "float" passes x through, a QParams fake-quantizes it; no observing

    def forward(self, x):
        if self._replay is not None:
            return x if isinstance(self._replay, str) else fake_quantize(x, self._replay)
        with torch.no_grad():
            self._observe(self._prepare(x))
        self.num_batches += 1
        return x

    def calculate_qparams(self) -> QParams:
        if self.num_batches == 0:
            raise CalibrationError(
                f"no calibration data reached {self.name!r} ({type(self).__name__}): pass "
                f"calibration=... with at least one sample, and check the calibration inputs "
                f"actually execute this part of the model")
        return self._calculate()

    def _prepare(self, x) -> Tensor:
        if not isinstance(x, Tensor):
            raise CalibrationError(f"observer at {self.name!r} expected a Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise CalibrationError(
                f"an empty tensor of shape {tuple(x.shape)} reached the observer at {self.name!r}: "
                f"calibration needs non-empty activations; check the calibration batch shapes")
        x = x.detach()
        return x if x.dtype == torch.float32 else x.to(torch.float32)

    def _check_finite(self, *stats: Tensor) -> None:
        if not all(bool(torch.isfinite(s).all()) for s in stats):
            raise CalibrationError(
                f"calibration data produced NaN/Inf at {self.name!r}: check the inputs/model "
                f"(run the float model on the same batch and look for overflow or invalid inputs); "
                f"the observer's statistics were left unchanged")

    def _observe(self, x: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _calculate(self) -> QParams:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, spec={self.spec.describe()!r}, num_batches={self.num_batches}"


class _RunningMinMaxObserver(Observer):
    """Running min / max reduced according to the spec's granularity."""

    def __init__(self, spec: QuantSpec, name: str = "<unnamed>"):
        super().__init__(spec, name)
        self.register_buffer("min_val", None)
        self.register_buffer("max_val", None)

    def _combine(self, old: Tensor, new: Tensor, is_min: bool) -> Tensor:
        return torch.minimum(old, new) if is_min else torch.maximum(old, new)

    def _observe(self, x: Tensor) -> None:
        mn, mx = reduce_minmax(x, self.spec)
        self._check_finite(mn, mx)
        if self.min_val is None:
            self.min_val, self.max_val = mn.clone(), mx.clone()
            return
        if mn.shape != self.min_val.shape:
            raise CalibrationError(
                f"observer at {self.name!r} saw statistics of shape {tuple(mn.shape)} after "
                f"{tuple(self.min_val.shape)}: {self.spec.granularity} needs a fixed channel/group layout")
        self.min_val = self._combine(self.min_val, mn, True)
        self.max_val = self._combine(self.max_val, mx, False)

    def _calculate(self) -> QParams:
        return compute_qparams(self.min_val, self.max_val, self.spec)


class _MovingAverageMixin:
    """Exponential moving average of each batch's min / max (``spec.averaging_constant``)."""

    def _combine(self, old: Tensor, new: Tensor, is_min: bool) -> Tensor:
        return old + self.spec.averaging_constant * (new - old)


class MinMaxObserver(_RunningMinMaxObserver):
    """Global min / max over every batch seen."""


class MovingAverageMinMaxObserver(_MovingAverageMixin, _RunningMinMaxObserver):
    """Moving average of per-batch min / max (first batch taken as is)."""


class PerChannelMinMaxObserver(_RunningMinMaxObserver):
    """Running min / max per channel along ``spec.axis`` (negative axes allowed)."""

    granularities = ("per_channel",)

    def _observe(self, x: Tensor) -> None:
        if not -x.dim() <= self.spec.axis < x.dim():
            raise CalibrationError(f"observer at {self.name!r}: per-channel axis {self.spec.axis} "
                                   f"does not exist in a tensor of shape {tuple(x.shape)}")
        super()._observe(x)


class MovingAveragePerChannelMinMaxObserver(_MovingAverageMixin, PerChannelMinMaxObserver):
    """Moving average of per-batch, per-channel min / max."""


class PerGroupMinMaxObserver(_RunningMinMaxObserver):
    """Min / max per group of ``spec.group_size`` along the last axis (weights ``[rows, cols]``).

    Statistics have shape ``[*x.shape[:-1], n_groups]``; a ragged last group is allowed.
    """

    granularities = ("per_group",)


class UnitScaleObserver(MinMaxObserver):
    """Scale 1 and an integer zero point, for values that are already integers (an image's pixel lattice
    after passes/input_lattice.py): every value is quantized exactly. The values seen are centred in the
    256-level window. Falls back to min / max when the spec does not hold 256 affine levels or the values
    seen span more than 256 integers."""

    def _calculate(self) -> QParams:
        lo, hi = round(float(self.min_val)), round(float(self.max_val))
        qmin, qmax = self.spec.quant_min, self.spec.quant_max
        if self.spec.symmetric or qmax - qmin != 255 or hi - lo > 255:
            return super()._calculate()
        zp = qmin - lo + (255 - (hi - lo)) // 2
        return QParams(scale=torch.ones(()), zero_point=torch.tensor(zp, dtype=torch.int64),
                       quant_min=qmin, quant_max=qmax, dtype=self.spec.dtype)


class PerChannelPairSumObserver(Observer):
    """Per-channel symmetric weights for kernels that add two u8 x s8 products in int16 before widening
    (``vpmaddubsw``: fbgemm's depthwise conv does it even on VNNI CPUs, docs/x86-kernels.md). The scale makes
    any two same-sign codes of a channel sum to at most 128 in magnitude, so a pair of products stays within
    255 * 128 = 32640 <= 32767 whichever taps the kernel pairs. That is the guarantee 7-bit codes give
    (2 * 64), at a finer step unless a channel's two largest same-sign weights are equal: a 3x3 filter
    whose centre tap dominates keeps nearly 8 bits."""

    granularities = ("per_channel",)
    PAIR_LIMIT = 127  # real-valued pair sum; each code rounds by <= 0.5, so integer pairs stay <= 128

    def __init__(self, spec: QuantSpec, name: str = "<unnamed>"):
        super().__init__(spec, name)
        if not spec.symmetric or not spec.signed:
            raise ConfigError(f"{name!r}: the pair_sum observer is for symmetric signed weights, got {spec.describe()}")
        self.register_buffer("weight", None)

    def _observe(self, x: Tensor) -> None:
        if not -x.dim() <= self.spec.axis < x.dim():
            raise CalibrationError(f"observer at {self.name!r}: per-channel axis {self.spec.axis} "
                                   f"does not exist in a tensor of shape {tuple(x.shape)}")
        self._check_finite(*torch.aminmax(x))
        self.weight = x.clone()

    def _calculate(self) -> QParams:
        w = self.weight.movedim(self.spec.axis, 0).reshape(self.weight.shape[self.spec.axis], -1)
        k = min(2, w.shape[1])
        pair = torch.maximum(w.clamp(min=0).topk(k, dim=1).values.sum(1), (-w).clamp(min=0).topk(k, dim=1).values.sum(1))
        half_range = (self.spec.quant_max - self.spec.quant_min) / 2.0  # compute_qparams: scale = amax / half_range
        amax = torch.maximum(pair * (half_range / self.PAIR_LIMIT), w.abs().amax(1))  # never clips a weight
        return compute_qparams(-amax, amax, self.spec)


class PerChannelMSEObserver(Observer):
    """Per-channel range minimising each channel's quantization MSE (weights).

    Keeps the last tensor it saw (weights are seen once) and, per channel, grid-searches
    ``n_candidates`` shrink factors of ``[min, max]`` from 1.0 down to ``min_fraction``. The error
    is measured exactly (fake-quantize and compare). For large tensors the candidates are first
    ranked with an analytic model on the sorted channel values (exact clipping error +
    ``scale**2/12`` rounding noise) and only the ``refine`` best plus 1.0 (min/max) are measured
    exactly, so the result is never worse than min/max.
    """

    granularities = ("per_channel",)
    exact_budget = 1 << 24  # elements x candidates measured exactly before switching to the model

    def __init__(self, spec: QuantSpec, name: str = "<unnamed>", n_candidates: int = 100,
                 min_fraction: float = 0.2, refine: int = 4):
        super().__init__(spec, name)
        self.n_candidates, self.min_fraction, self.refine = n_candidates, min_fraction, refine
        self.register_buffer("weight", None)

    def _observe(self, x: Tensor) -> None:
        if not -x.dim() <= self.spec.axis < x.dim():
            raise CalibrationError(f"observer at {self.name!r}: per-channel axis {self.spec.axis} "
                                   f"does not exist in a tensor of shape {tuple(x.shape)}")
        mn, mx = reduce_minmax(x, self.spec)
        self._check_finite(mn, mx)
        self.weight = x.clone()

    def _calculate(self) -> QParams:
        axis = self.spec.axis
        w = self.weight.movedim(axis, 0).reshape(self.weight.shape[axis], -1)
        return compute_qparams(*self._search(w), self.spec)

    def _search(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """The MSE-best range of every row of ``w`` [rows, n]."""
        mn, mx = torch.aminmax(w, dim=1)
        mn, mx = mn.clamp(max=0.0), mx.clamp(min=0.0)
        alphas = torch.linspace(1.0, self.min_fraction, self.n_candidates)
        if w.numel() * self.n_candidates <= self.exact_budget:
            cand = alphas[:, None].expand(-1, w.shape[0])
        else:
            cost = self._model_costs(w, mn, mx, alphas)  # [C, K]
            top = cost.topk(min(self.refine, len(alphas)), dim=1, largest=False).indices.T
            cand = torch.cat([torch.ones(1, w.shape[0]), alphas[top]])
        best = self._exact_best(w, mn, mx, cand)
        return mn * best, mx * best

    def _model_costs(self, w: Tensor, mn: Tensor, mx: Tensor, alphas: Tensor) -> Tensor:
        """Analytic per-channel MSE of every candidate, [channels, candidates]."""
        v = w.sort(dim=1).values.to(torch.float64)
        n = v.shape[1]
        zero = torch.zeros(v.shape[0], 1, dtype=torch.float64)
        p1 = torch.cat([zero, v.cumsum(1)], 1)
        p2 = torch.cat([zero, (v * v).cumsum(1)], 1)
        qp = compute_qparams(mn[:, None] * alphas, mx[:, None] * alphas, self.spec)
        rlo, rhi = representable_range(qp)
        il = torch.searchsorted(v, rlo.contiguous())
        ir = torch.searchsorted(v, rhi.contiguous(), right=True)
        left = il * rlo**2 - 2 * rlo * p1.gather(1, il) + p2.gather(1, il)
        right = ((n - ir) * rhi**2 - 2 * rhi * (p1[:, -1:] - p1.gather(1, ir))
                 + (p2[:, -1:] - p2.gather(1, ir)))
        zeros = (w == 0).sum(1, keepdim=True)
        inside = (ir - il - zeros).clamp_min(0) * qp.scale.to(torch.float64) ** 2 / 12.0
        return left.clamp_min(0) + right.clamp_min(0) + inside

    def _exact_best(self, w: Tensor, mn: Tensor, mx: Tensor, cand: Tensor) -> Tensor:
        """Per channel, the candidate fraction (rows of ``cand``) with the lowest exact error."""
        best_err = torch.full_like(mn, math.inf)
        best = torch.ones_like(mn)
        chunk = max(1, (1 << 22) // w.numel())
        for a in cand.split(chunk):
            qp = compute_qparams(mn * a, mx * a, self.spec)
            s, zp = qp.scale[:, :, None], qp.zero_point[:, :, None].to(torch.float32)
            fq = torch.round(w / s).add_(zp).clamp_(qp.quant_min, qp.quant_max).sub_(zp).mul_(s)
            err_min, idx = fq.sub_(w).square_().sum(-1).min(0)
            better = err_min < best_err
            best_err = torch.where(better, err_min, best_err)
            best = torch.where(better, a.gather(0, idx[None])[0], best)
        return best


class PerGroupMSEObserver(PerChannelMSEObserver):
    """Per-group range minimising each group's quantization MSE (low-bit group-wise weights): the
    per-channel search run on every group of ``spec.group_size`` values along the last axis. A ragged
    last group is padded with zeros, which every range represents exactly."""

    granularities = ("per_group",)

    def _observe(self, x: Tensor) -> None:
        mn, mx = reduce_minmax(x, self.spec)
        self._check_finite(mn, mx)
        self.weight = x.clone()

    def _calculate(self) -> QParams:
        w, g = self.weight, int(self.spec.group_size)
        k = w.shape[-1]
        n_groups = -(-k // g)
        rows = torch.nn.functional.pad(w.reshape(-1, k), (0, n_groups * g - k)).reshape(-1, g)
        mn, mx = self._search(rows)
        shape = (*w.shape[:-1], n_groups)
        return compute_qparams(mn.reshape(shape), mx.reshape(shape), self.spec)


# ---------------------------------------------------------------- histogram range searches


def _bin_centers(hist: Tensor, hist_min: float, bin_width: float) -> Tensor:
    k = torch.arange(hist.numel(), dtype=torch.float64)
    return hist_min + (k + 0.5) * bin_width


def histogram_percentile_range(hist: Tensor, hist_min: float, bin_width: float, percentile: float,
                               data_min: float, data_max: float) -> tuple[float, float]:
    """Two-sided percentile: ``(100 - p)``% of the mass is clipped from each tail (linear
    interpolation inside a bin), the result is clipped to the observed ``[data_min, data_max]``."""
    if percentile >= 100.0:
        return data_min, data_max
    h = hist.to(torch.float64)
    cdf = torch.cumsum(h, 0)
    total = float(cdf[-1])

    def value_at(target: float) -> float:
        k = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64))[0].clamp(max=h.numel() - 1))
        prev = float(cdf[k - 1]) if k > 0 else 0.0
        frac = (target - prev) / float(h[k]) if float(h[k]) > 0 else 0.0
        return hist_min + (k + min(max(frac, 0.0), 1.0)) * bin_width

    tail = total * (1.0 - percentile / 100.0)
    lo, hi = value_at(tail), value_at(total - tail)
    return min(max(lo, data_min), data_max), min(max(hi, data_min), data_max)


def _without_zeros(hist: Tensor, hist_min: float, bin_width: float, zero_count: float) -> Tensor:
    """float64 copy of the histogram without the exact zeros (0 is always exactly representable,
    and a post-ReLU zero spike would otherwise dominate the range search)."""
    h = hist.to(torch.float64).clone()
    if zero_count:
        z = min(max(int((0.0 - hist_min) // bin_width), 0), h.numel() - 1)
        near = slice(max(z - 1, 0), z + 2)  # 0 on a bin edge may have gone either way in histc
        z = near.start + int(torch.argmax(h[near]))
        h[z] = max(float(h[z]) - zero_count, 0.0)
    return h


def _candidate_pairs(lo0: float, hi0: float, spec: QuantSpec, alphas: Tensor,
                     grid: bool) -> tuple[Tensor, Tensor]:
    """Candidate (min, max) ranges: shrinks of the observed range (2-D grid for affine if asked)."""
    if spec.symmetric:
        amax = max(-lo0, hi0)
        return -amax * alphas, amax * alphas
    if grid and lo0 < 0.0 < hi0:
        lo, hi = torch.meshgrid(lo0 * alphas, hi0 * alphas, indexing="ij")
        return lo.reshape(-1), hi.reshape(-1)
    return lo0 * alphas, hi0 * alphas


def _candidate_grid(lo: Tensor, hi: Tensor, spec: QuantSpec):
    """Per-candidate (scale, zero_point, representable min, representable max) in float64."""
    qp = compute_qparams(lo, hi, spec)
    rlo, rhi = representable_range(qp)
    return qp.scale.to(torch.float64), qp.zero_point.to(torch.float64), rlo, rhi


def histogram_mse_costs(hist: Tensor, hist_min: float, bin_width: float, lo: Tensor, hi: Tensor,
                        spec: QuantSpec, zero_count: float = 0.0) -> Tensor:
    """Expected squared error of quantizing the histogram with each candidate range.

    Mass inside the representable range costs ``scale**2 / 12`` (uniform rounding noise), mass
    outside costs its squared distance to the range edge (+ ``bin_width**2 / 12`` for the spread
    inside a bin). Exact zeros (``zero_count``) cost nothing: 0 is always representable.
    Vectorised over candidates with prefix sums: O(bins + candidates).
    """
    h = _without_zeros(hist, hist_min, bin_width, zero_count)
    c = _bin_centers(h, hist_min, bin_width)
    zero = torch.zeros(1, dtype=torch.float64)
    h0, h1, h2 = (torch.cat([zero, torch.cumsum(v, 0)]) for v in (h, h * c, h * c * c))
    s, _, rlo, rhi = _candidate_grid(lo, hi, spec)
    il = torch.searchsorted(c, rlo)
    ir = torch.searchsorted(c, rhi, right=True)
    spread = bin_width**2 / 12.0
    left = rlo**2 * h0[il] - 2 * rlo * h1[il] + h2[il] + spread * h0[il]
    s0, s1, s2 = h0[-1] - h0[ir], h1[-1] - h1[ir], h2[-1] - h2[ir]
    right = rhi**2 * s0 - 2 * rhi * s1 + s2 + spread * s0
    inside = (h0[ir] - h0[il]) * s**2 / 12.0
    return left.clamp_min(0) + right.clamp_min(0) + inside


def histogram_mse_range(hist: Tensor, hist_min: float, bin_width: float, spec: QuantSpec,
                        data_min: float, data_max: float, zero_count: float = 0.0) -> tuple[float, float]:
    """Range minimising ``histogram_mse_costs`` over shrinks of the observed range (affine: a
    2-D grid of independent min / max shrinks, ~32k candidates evaluated at once)."""
    lo0, hi0 = min(data_min, 0.0), max(data_max, 0.0)
    if lo0 == hi0:
        return lo0, hi0
    lo, hi = _candidate_pairs(lo0, hi0, spec, _shrink_factors(), grid=True)
    best = int(torch.argmin(histogram_mse_costs(hist, hist_min, bin_width, lo, hi, spec, zero_count)))
    return float(lo[best]), float(hi[best])


def _xlogx(v: Tensor) -> Tensor:
    return torch.where(v > 0, v * torch.log(torch.where(v > 0, v, 1.0)), 0.0)


def histogram_kl_costs(hist: Tensor, hist_min: float, bin_width: float, lo: Tensor, hi: Tensor,
                       spec: QuantSpec, zero_count: float = 0.0) -> Tensor:
    """KL(P || Q) per candidate as in TensorRT entropy calibration, on a two-sided grid.

    P: histogram bins whose centres the candidate grid represents, with the clipped tails folded
    into the first / last represented bin. Q: the same bins *without* the folded tails, summed per
    quantization level (the candidate's actual rounding of the bin centres, so asymmetric /
    unsigned grids and zero points are honoured) and spread evenly over that level's bins where P
    is non-empty (floored at a tiny mass, like TensorRT/MXNet smoothing). Exact zeros
    (``zero_count``) are left out: they are represented exactly. Candidates with less than one
    histogram bin per level get +inf (the divergence would be trivially 0).

    Evaluated per level with prefix sums (O(candidates x levels)), not per bin.
    """
    s, zp, _, _ = _candidate_grid(lo, hi, spec)
    kl = torch.full_like(s, math.inf)
    ok = s >= bin_width
    h = _without_zeros(hist, hist_min, bin_width, zero_count)
    total = float(h.sum())
    if not bool(ok.any()) or total == 0.0:
        return torch.where(ok, 0.0, kl)
    s, zp = s[ok][:, None], zp[ok][:, None]
    n, n_levels = h.numel(), spec.quant_max - spec.quant_min + 1
    c = _bin_centers(h, hist_min, bin_width)
    edges = torch.arange(spec.quant_min, spec.quant_max + 2, dtype=torch.float64) - 0.5
    b = torch.searchsorted(c, ((edges - zp) * s).contiguous())  # level k holds bins [b_k, b_k+1)
    first, stop = b[:, :1], b[:, -1:]
    cum, nzc, hlh = (_prefix(v) for v in (h, (h > 0).to(torch.float64), _xlogx(h)))
    below, above = cum[first], total - cum[stop]
    fi, la = first.clamp(max=n - 1), (stop - 1).clamp(min=0)
    single = fi == la
    lf = (b[:, 1:] <= fi).sum(1, keepdim=True).clamp(max=n_levels - 1)
    ll = (b[:, 1:] <= la).sum(1, keepdim=True).clamp(max=n_levels - 1)
    q_sum = cum[b[:, 1:]] - cum[b[:, :-1]]
    cnt = nzc[b[:, 1:]] - nzc[b[:, :-1]]
    p_sum = q_sum.scatter_add(1, lf, below).scatter_add_(1, ll, above)
    hf, hl = h[fi], h[la]
    pf = hf + below + torch.where(single, above, 0.0)
    pl = torch.where(single, hl, hl + above)
    cnt.scatter_add_(1, lf, ((hf == 0) & (pf > 0)).to(torch.float64))
    cnt.scatter_add_(1, ll, (~single & (hl == 0) & (pl > 0)).to(torch.float64))
    p_logp = (hlh[stop] - hlh[first] + _xlogx(pf) - _xlogx(hf)
              + torch.where(single, 0.0, _xlogx(pl) - _xlogx(hl)))
    q = (q_sum / cnt.clamp_min(1.0)).clamp_min(1e-6 * total / n)
    cross = (p_sum * torch.log(q)).sum(1, keepdim=True)
    kl[ok] = torch.where(stop > first, (p_logp - cross) / total, math.inf).squeeze(1)
    return kl


def _prefix(v: Tensor) -> Tensor:
    return torch.cat([torch.zeros(1, dtype=v.dtype), torch.cumsum(v, 0)])


def histogram_entropy_range(hist: Tensor, hist_min: float, bin_width: float, spec: QuantSpec,
                            data_min: float, data_max: float, zero_count: float = 0.0) -> tuple[float, float]:
    """Minimum-KL range. Symmetric: one threshold. Affine: a joint shrink of both ends, then the
    max and the min refined independently (three vectorised 1-D searches)."""
    lo0, hi0 = min(data_min, 0.0), max(data_max, 0.0)
    if lo0 == hi0:
        return lo0, hi0
    alphas = _shrink_factors()

    def search(lo: Tensor, hi: Tensor) -> tuple[float, float]:
        costs = histogram_kl_costs(hist, hist_min, bin_width, lo, hi, spec, zero_count)
        best = int(torch.argmin(costs)) if bool(torch.isfinite(costs).any()) else 0
        return float(lo[best]), float(hi[best])

    lo, hi = search(*_candidate_pairs(lo0, hi0, spec, alphas, grid=False))
    if spec.symmetric or lo0 == 0.0 or hi0 == 0.0:
        return lo, hi
    lo, hi = search(torch.full_like(alphas, lo), hi0 * alphas)
    return search(lo0 * alphas, torch.full_like(alphas, hi))


class HistogramObserver(Observer):
    """Streaming histogram of ``bins`` bins whose range grows with the data.

    The bins sit on a lattice ``hist_min + k * bin_width``. When a batch falls outside, the range is
    extended by whole old bins and the bin width multiplied by an integer factor, so old counts
    merge exactly into new bins (no re-sampling blur, memory stays ``bins`` counts). The range
    always contains 0. ``method``: "percentile" (``spec.percentile``, each tail), "mse", "entropy" or "auto"
    (``chosen``, set by qcompile.passes.range_choice, among RANGE_METHODS; "mse" until then). ``range_for(m)`` gives
    the range any of RANGE_METHODS would pick from the same histogram.
    """

    def __init__(self, spec: QuantSpec, name: str = "<unnamed>", method: str | None = None,
                 bins: int = 2048):
        super().__init__(spec, name)
        method = method or spec.observer
        if method not in HISTOGRAM_METHODS:
            raise ConfigError(f"HistogramObserver method must be one of {HISTOGRAM_METHODS}, got {method!r}")
        self.method = method
        self.chosen: str | None = None
        self.elements = 0  # elements of the largest batch seen (range_choice's cost estimate)
        self.bins = bins
        self.hist_min = 0.0
        self.bin_width = 0.0
        self.zero_count = 0.0
        self.register_buffer("histogram", None)
        self.register_buffer("min_val", None)
        self.register_buffer("max_val", None)
        self.channel_amax: Tensor | None = None  # per channel (dim 1 of 4-D, else the last dim) abs-max

    @property
    def hist_max(self) -> float:
        return self.hist_min + self.bins * self.bin_width

    def _observe(self, x: Tensor) -> None:
        mn, mx = torch.aminmax(x)
        self._check_finite(mn, mx)
        if self.histogram is None:
            self.min_val, self.max_val = mn.clone(), mx.clone()
            lo, hi = min(float(mn), 0.0), max(float(mx), 0.0)
            self.hist_min, self.bin_width = lo, max((hi - lo) / self.bins, _MIN_BIN_WIDTH)
            self.histogram = torch.zeros(self.bins, dtype=torch.float64)
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, mn), torch.maximum(self.max_val, mx)
            self._grow(min(float(mn), 0.0), max(float(mx), 0.0))
        self._accumulate(x, float(mn), float(mx))
        self.zero_count += float(x.numel() - int(torch.count_nonzero(x)))
        self.elements = max(self.elements, x.numel())
        if self.method == "auto" and x.dim() >= 2:  # outlier channels, reported by range_choice
            dim = 1 if x.dim() == 4 else x.dim() - 1
            amax = x.abs().transpose(0, dim).reshape(x.shape[dim], -1).amax(1)
            if self.channel_amax is None or self.channel_amax.shape != amax.shape:
                self.channel_amax = amax if self.channel_amax is None else None
            else:
                self.channel_amax = torch.maximum(self.channel_amax, amax)

    def _grow(self, lo: float, hi: float) -> None:
        """Extend the lattice to cover [lo, hi]: shift by ``j`` old bins, merge ``r`` bins into one."""
        if lo >= self.hist_min and hi <= self.hist_max:
            return
        n, w = self.bins, self.bin_width
        j = math.ceil((self.hist_min - lo) / w) if lo < self.hist_min else 0
        need = max(j + math.ceil((hi - self.hist_min) / w), j + n)
        r = math.ceil(need / n)
        shift, rem = divmod(j, r)
        k = torch.arange(n)
        if r <= n:
            idx = (k + rem) // r + shift
        else:  # old bins straddle at most one new-bin boundary; avoid int64 overflow
            idx = (k >= min(r - rem, n)).to(torch.int64) + shift
        self.histogram = torch.zeros_like(self.histogram).index_add_(0, idx.clamp(max=n - 1), self.histogram)
        self.hist_min -= j * w
        self.bin_width = w * r

    def _accumulate(self, x: Tensor, mn: float, mx: float) -> None:
        lo32 = float(torch.tensor(self.hist_min, dtype=torch.float32))
        hi32 = float(torch.tensor(self.hist_max, dtype=torch.float32))
        if mn < lo32 or mx > hi32:  # float32 rounding of the lattice ends: keep every sample
            x = x.clamp(lo32, hi32)
        counts = torch.histc(x, bins=self.bins, min=lo32, max=hi32)
        self.histogram += counts.to(torch.float64)

    @property
    def effective_method(self) -> str:
        return (self.chosen or RANGE_METHODS[0]) if self.method == "auto" else self.method

    def outlier_channels(self, ratio: float = 8.0) -> list[int]:
        """Channels (dim 1 of a 4-D activation, else the last dim) whose abs-max is > ``ratio`` x the median
        channel's, largest first."""
        a = self.channel_amax
        if a is None or a.numel() < 8:
            return []
        med = float(a.median())
        if med <= 0:
            return []
        idx = torch.nonzero(a > ratio * med).flatten()
        return idx[a[idx].argsort(descending=True)].tolist()

    def clipped_channels(self, channels: list[int], method: str | None = None) -> list[int]:
        """Those of ``channels`` whose abs-max lies beyond the range ``method`` (default: in force) gives."""
        if not channels or self.channel_amax is None:
            return []
        lo, hi = self.range_for(method or self.effective_method)
        return [c for c in channels if float(self.channel_amax[c]) > max(-lo, hi) * (1 + 1e-6)]

    def range_for(self, method: str) -> tuple[float, float]:
        args = (self.histogram, self.hist_min, self.bin_width)
        data = (float(self.min_val), float(self.max_val))
        if method == "minmax":
            return data
        if method == "percentile":
            return histogram_percentile_range(*args, self.spec.percentile, *data)
        if method == "mse":
            return histogram_mse_range(*args, self.spec, *data, zero_count=self.zero_count)
        if method == "entropy":
            return histogram_entropy_range(*args, self.spec, *data, zero_count=self.zero_count)
        raise ConfigError(f"unknown range method {method!r} (one of {RANGE_METHODS})")

    def qparams_for(self, method: str) -> QParams:
        if self.num_batches == 0:
            return self.calculate_qparams()  # the error naming the observer
        lo, hi = self.range_for(method)
        return compute_qparams(torch.tensor(lo), torch.tensor(hi), self.spec)

    def _range(self) -> tuple[float, float]:
        return self.range_for(self.effective_method)

    def _calculate(self) -> QParams:
        lo, hi = self._range()
        return compute_qparams(torch.tensor(lo), torch.tensor(hi), self.spec)


def make_observer(spec: QuantSpec, name: str = "<unnamed>") -> Observer:
    """The observer calibrating ``spec`` (see the module docstring for the mapping)."""
    if not isinstance(spec, QuantSpec):
        raise ConfigError(f"make_observer needs a QuantSpec, got {type(spec).__name__} "
                          f"(shared / derived / fixed specs are not calibrated)")
    if spec.granularity == "per_tensor":
        if spec.observer == "minmax":
            return MinMaxObserver(spec, name)
        if spec.observer == "moving_average":
            return MovingAverageMinMaxObserver(spec, name)
        if spec.observer == "unit_scale":
            return UnitScaleObserver(spec, name)
        return HistogramObserver(spec, name, method=spec.observer)
    if spec.granularity == "per_channel":
        if spec.observer in ("mse", "auto"):  # no per-channel choice: MSE
            return PerChannelMSEObserver(spec, name)
        if spec.observer == "pair_sum":
            return PerChannelPairSumObserver(spec, name)
        if spec.observer == "moving_average":
            return MovingAveragePerChannelMinMaxObserver(spec, name)
        return PerChannelMinMaxObserver(spec, name)
    if spec.granularity == "per_group":
        return (PerGroupMSEObserver if spec.observer in ("mse", "auto") else PerGroupMinMaxObserver)(spec, name)
    raise ConfigError(f"{name!r}: per_token specs are quantized dynamically at run time; "
                      f"there is nothing to calibrate (do not insert an observer)")


def weight_qparams(w: Tensor, spec: QuantSpec) -> QParams:
    """The parameters round-to-nearest convert gives a weight tensor under ``spec`` (its observer run once)."""
    obs = make_observer(spec)
    obs(w.detach())
    return obs.calculate_qparams()
