"""Weight rounding: round-to-nearest (RTN) and GPTQ (Frantar et al., 2022).

GPTQ quantizes a weight ``W [N, K]`` one input column at a time and spreads each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction loss ``||W X - Q X||^2`` (``H = X^T X`` from calibration inputs ``X [M, K]``).
This module is the math, on plain tensors:

* :class:`Hessian` accumulates ``X^T X`` batch by batch (memory ``K x K``, never the activations);
  conv inputs are unfolded (im2col) first, one Hessian per conv group.
* :class:`UniformGrid` / :class:`NF4Grid` say how a block of columns is rounded (the grid of a
  ``QuantSpec`` or NF4) and assemble the final ``QParams`` / ``NF4Params``.
* :func:`gptq` is the Cholesky-based algorithm with lazy batch updates (``block_size`` columns
  at a time), optional act-order (columns by decreasing Hessian diagonal, groups kept static so
  they stay contiguous in the original order) and damping.

The graph side (which layers, in which order, with which calibration inputs) is
``qcompile.passes.weight_only``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .lowbit import NF4Params, nf4_codes, nf4_params, nf4_values
from .specs import NF4Spec, QParams, QuantSpec

ALGORITHMS = ("rtn", "gptq")


@dataclass(frozen=True)
class GPTQConfig:
    """block_size: columns updated lazily together; damp: fraction of the mean Hessian diagonal
    added to it; act_order: quantize columns by decreasing Hessian diagonal."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True  # MiniLM int4 g128: min cosine 0.9726 vs 0.9708 without (groups stay static, no cost)


# -- Hessians ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvGeometry:
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int


class Hessian:
    """Streaming ``sum(x x^T)`` over calibration rows; ``groups`` independent blocks for grouped convs.

    ``add(x, ref=...)`` also streams the cross term ``sum(ref x^T)`` and ``sum(ref ref^T)``, where ``ref`` is
    the same layer's input in the float model: the error of ``Q x`` against the float layer's output ``W ref``
    (the earlier layers' rounding included) is then ``tr(Q H Q^T) - 2 tr(W C Q^T) + tr(W F W^T)``."""

    def __init__(self, k: int, groups: int = 1, conv: ConvGeometry | None = None):
        self.k, self.groups, self.conv = k, groups, conv
        self.sum = torch.zeros(groups, k, k, dtype=torch.float64)
        self.cross = self.ref = None  # [G, K, K] sums of ref x^T and ref ref^T, when add() is given ref
        self.rows = 0

    def _rows(self, x: Tensor) -> Tensor:
        x = x.detach().float()
        if self.conv is not None:
            c = self.conv
            x = F.unfold(x, c.kernel_size, c.dilation, c.padding, c.stride)  # [B, C*kh*kw, L]
            x = x.transpose(1, 2).reshape(-1, x.shape[1])
        else:
            x = x.reshape(-1, x.shape[-1])
        return x.reshape(x.shape[0], self.groups, self.k).permute(1, 2, 0)  # [G, K, rows]

    def add(self, x: Tensor, ref: Tensor | None = None) -> None:
        xg = self._rows(x)
        self.sum += torch.bmm(xg, xg.transpose(1, 2)).double()  # one batched GEMM for every conv group
        if ref is not None:
            rg = self._rows(ref)
            if self.cross is None:
                self.cross, self.ref = torch.zeros_like(self.sum), torch.zeros_like(self.sum)
            self.cross += torch.bmm(rg, xg.transpose(1, 2)).double()
            self.ref += torch.bmm(rg, rg.transpose(1, 2)).double()
        self.rows += xg.shape[2]

    def matrix(self, group: int = 0) -> Tensor:
        if self.rows == 0:
            raise ValueError("no calibration rows reached this layer")
        return self.sum[group] / self.rows

    def matrices(self) -> Tensor:
        """Every group's matrix, ``[G, K, K]`` (float64)."""
        if self.rows == 0:
            raise ValueError("no calibration rows reached this layer")
        return self.sum / self.rows

    def cross_matrices(self) -> tuple[Tensor, Tensor] | None:
        """``(C, F)``, each ``[G, K, K]`` (float64), or None when no float reference was streamed."""
        return None if self.cross is None else (self.cross / self.rows, self.ref / self.rows)


class FoldedHessian:
    """Two Hessians of alternating calibration samples (``add(x, fold)``) and their union.

    GPTQ fitted on one fold and scored on the other says whether it generalizes better than
    round-to-nearest; with few calibration samples it can overfit (EfficientNet-Lite2 8-bit, 32 images:
    agreement fell below round-to-nearest) and the layer then keeps round-to-nearest."""

    def __init__(self, k: int, groups: int = 1, conv: ConvGeometry | None = None):
        self.k, self.groups, self.conv = k, groups, conv
        self.folds = (Hessian(k, groups, conv), Hessian(k, groups, conv))

    def add(self, x: Tensor, fold: int = 0, ref: Tensor | None = None) -> None:
        self.folds[fold % 2].add(x, ref)

    @property
    def rows(self) -> int:
        return self.folds[0].rows + self.folds[1].rows

    def matrix(self, group: int = 0) -> Tensor:
        if self.rows == 0:
            raise ValueError("no calibration rows reached this layer")
        return (self.folds[0].sum[group] + self.folds[1].sum[group]) / self.rows

    def matrices(self) -> Tensor:
        """Every group's matrix over both folds, ``[G, K, K]`` (float64)."""
        if self.rows == 0:
            raise ValueError("no calibration rows reached this layer")
        return (self.folds[0].sum + self.folds[1].sum) / self.rows

    def cross_matrices(self) -> tuple[Tensor, Tensor] | None:
        folds = [f for f in self.folds if f.rows]
        if not folds or any(f.cross is None for f in folds):
            return None
        return sum(f.cross for f in folds) / self.rows, sum(f.ref for f in folds) / self.rows

    @property
    def cross_validates(self) -> bool:
        return all(f.rows > 0 for f in self.folds)


# -- grids -------------------------------------------------------------------------------------
class UniformGrid:
    """The integer grid of a weight ``QuantSpec`` (per_tensor / per_channel along axis 0 / per_group).

    Ranges come from the same observers convert uses for round-to-nearest (minmax, mse...)."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.group_size = spec.group_size if spec.granularity == "per_group" else None
        rows = "per_tensor" if spec.granularity == "per_tensor" else "per_channel"
        self.row_spec = replace(spec, granularity=rows, axis=0 if rows == "per_channel" else None, group_size=None)

    def fit(self, block: Tensor):
        from .observers import weight_qparams
        qp = weight_qparams(block, self.row_spec)
        n = block.shape[0]
        return qp.scale.float().expand(n).clone(), qp.zero_point.float().expand(n).clone()

    def fake(self, cols: Tensor, params) -> Tensor:
        s, z = params[0].reshape(-1, 1), params[1].reshape(-1, 1)
        q = torch.clamp(torch.round(cols / s) + z, self.spec.quant_min, self.spec.quant_max)
        return (q - z) * s

    def assemble(self, groups: list, shape: tuple) -> QParams:
        spec = self.spec
        scale = torch.stack([g[0] for g in groups], dim=1)
        zp = torch.stack([g[1] for g in groups], dim=1).round().to(torch.int64)
        if self.group_size is None:
            scale, zp = scale[:, 0], zp[:, 0]
            if spec.granularity == "per_tensor":
                scale, zp = scale[0], zp[0]
        return QParams(scale=scale, zero_point=zp, quant_min=spec.quant_min, quant_max=spec.quant_max,
                       dtype=spec.dtype, axis=0 if spec.granularity == "per_channel" else None,
                       group_size=self.group_size)


class NF4Grid:
    """NF4 codes times per-group absmax; the absmax (double-quantized) is fixed before rounding."""

    def __init__(self, spec: NF4Spec):
        self.spec, self.group_size = spec, spec.group_size
        self.params: NF4Params | None = None

    def prepare(self, w: Tensor) -> None:
        s = self.spec
        self.params = nf4_params(w, s.group_size, s.double_quant, s.scale_block)

    def static(self, group: int):
        return self.params.absmax[:, group]

    def fake(self, cols: Tensor, absmax) -> Tensor:
        a = absmax.reshape(-1, 1)
        return nf4_values(nf4_codes(cols / a)) * a

    def assemble(self, groups: list, shape: tuple) -> NF4Params:
        return self.params


def make_grid(spec):
    if isinstance(spec, NF4Spec):
        return NF4Grid(spec)
    if isinstance(spec, QuantSpec):
        return UniformGrid(spec)
    raise TypeError(f"no weight grid for spec {spec!r}")


# -- GPTQ ---------------------------------------------------------------------------------------
def _inverse_hessian_factor(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1 = U^T U``, retrying with more damping.

    With ``J`` the exchange matrix and ``J H J = L L^T``: ``U = J L^-1 J`` (one Cholesky and one
    triangular inverse, float32, instead of Cholesky, inverse and a second Cholesky)."""
    h = h.float()
    k = h.shape[0]
    eye = torch.eye(k)
    mean_diag = torch.diagonal(h).mean().clamp_min(1e-12)
    rev = torch.arange(k - 1, -1, -1)
    for d in (damp, damp * 10, damp * 100, 1.0):
        lower, info = torch.linalg.cholesky_ex((h + d * mean_diag * eye)[rev][:, rev])
        if int(info) == 0:
            inv = torch.linalg.solve_triangular(lower, eye, upper=False)
            u = inv[rev][:, rev]
            if bool(torch.isfinite(u).all()):
                return u
    raise ValueError("the Hessian is not positive definite even with damping 1.0")


def _static_params(grid, w: Tensor, k: int):
    """Per-group parameters fixed from the original weight (NF4, per-channel, or act-order groups)."""
    if isinstance(grid, NF4Grid):
        grid.prepare(w)
        return [grid.static(g) for g in range(k // grid.group_size)]
    g = grid.group_size or k
    return [grid.fit(w[:, i:i + g]) for i in range(0, k, g)]


@contextlib.contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gptq(w: Tensor, h: Tensor, grid, cfg: GPTQConfig = GPTQConfig()):
    """Quantize a 2-D weight with GPTQ. Returns (weight on the grid, dequantized [N, K]; its params).

    Works on ``W^T`` so that a column and the rows still to update are contiguous memory (an update of
    a strided column block is ~1000x slower with two threads here)."""
    W = w.detach().float().clone()
    n, k = W.shape
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    W[:, dead] = 0.0
    g = grid.group_size or k
    dynamic = grid.group_size is not None and not cfg.act_order and not isinstance(grid, NF4Grid)
    params = None if dynamic else _static_params(grid, W, k)
    perm = torch.argsort(torch.diagonal(h), descending=True) if cfg.act_order else torch.arange(k)
    Wt, h = W[:, perm].t().contiguous(), h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, cfg.damp)
    bs = max(cfg.block_size // g, 1) * g if dynamic else cfg.block_size
    Qt, found, group_of = torch.zeros_like(Wt), [], (perm // g).tolist()
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1, Err1, hinv1 = Wt[i1:i2].clone(), torch.zeros(i2 - i1, n), hinv[i1:i2, i1:i2]
        with _one_thread():  # tiny ops: OpenMP only adds barrier stalls (100x under contention here)
            for i in range(i2 - i1):
                if dynamic and (i1 + i) % g == 0:
                    found.append(grid.fit(W1[i:i + g].t()))
                q = grid.fake(W1[i][:, None], found[-1] if dynamic else params[group_of[i1 + i]])[:, 0]
                Qt[i1 + i] = q
                err = (W1[i] - q) / hinv1[i, i]
                W1[i:].addr_(hinv1[i, i:], err, alpha=-1)
                Err1[i] = err
        Wt[i2:] -= hinv[i1:i2, i2:].t() @ Err1
    Q = Qt.t()[:, torch.argsort(perm)].contiguous()
    return Q, grid.assemble(found if dynamic else params, tuple(w.shape))


def rtn(w: Tensor, grid):
    """Round-to-nearest on the same grid: the baseline GPTQ is compared with."""
    W = w.detach().float()
    k = W.shape[1]
    params = _static_params(grid, W, k)
    g = grid.group_size or k
    Q = torch.cat([grid.fake(W[:, i:i + g], params[i // g]) for i in range(0, k, g)], dim=1)
    return Q, grid.assemble(params, tuple(w.shape))


def quadratic_error(w: Tensor, q: Tensor, hess, energy: bool = True) -> tuple[float, float | None]:
    """``(tr(D H D^T), tr(W H W^T))`` summed over conv groups: the layer's output error on the
    calibration rows behind ``hess`` and the output energy, with ``D = W - Q``. When ``hess`` streamed the
    float model's inputs too (``Hessian.add(x, ref)``), the error is that of ``Q x`` against the float
    layer's ``W ref``, the earlier layers' error included, and the energy ``tr(W F W^T)``. ``energy=False``: the
    error alone (None for the energy; a [K, K] product per conv group saved, where only errors are compared)."""
    g = hess.groups
    w2, q2 = w.reshape(g, w.shape[0] // g, -1).float(), q.reshape(g, q.shape[0] // g, -1).float()
    h64 = hess.matrices()  # [G, K, K] (float64): every conv group in one batched product
    h = h64.float()
    quad = lambda a, m, b: float((torch.bmm(a, m) * b).sum())  # noqa: E731
    cross = hess.cross_matrices()
    if cross is None:
        return quad(w2 - q2, h, w2 - q2), (max(quad(w2, h, w2), 1e-30) if energy else None)
    # |D x + W (x - x_float)|^2 with D = Q - W: no difference of large terms, so float32 holds
    c, f = cross
    m, e = (h64 - c.transpose(1, 2)).float(), (h64 - c - c.transpose(1, 2) + f).float()
    d = q2 - w2
    return (max(quad(d, h, d) + 2 * quad(d, m, w2) + quad(w2, e, w2), 0.0),
            max(quad(w2, f.float(), w2), 1e-30) if energy else None)


def breaks_pair_bound(q: Tensor, qp, spec) -> bool:
    """True when ``spec`` asks for the "pair_sum" range (x86 depthwise: two u8 x s8 products are added in
    int16) and the rounded weight ``q`` has two same-sign codes in a channel summing past 128 in magnitude.
    Learned rounding moves a code up where round-to-nearest would go down, so it can reach 129."""
    if getattr(spec, "observer", None) != "pair_sum":
        return False
    return codes_break_pair_bound(torch.round(q.detach().float().reshape(q.shape[0], -1) / qp.scale.float().reshape(-1, 1)))


def codes_break_pair_bound(codes: Tensor) -> bool:
    """True when two same-sign codes of a channel (rows of ``codes``, any trailing shape) sum past 128 in
    magnitude: a kernel adding two u8 x s8 products in int16 (fbgemm's depthwise conv) could saturate."""
    codes = codes.reshape(codes.shape[0], -1).float()
    k = min(2, codes.shape[1])
    pair = torch.maximum(codes.clamp(min=0).topk(k, 1).values.sum(1), (-codes).clamp(min=0).topk(k, 1).values.sum(1))
    return bool((pair > 128).any())


def rtn_grouped(w: Tensor, groups: int, spec) -> Tensor:
    """Round-to-nearest of a conv / linear weight of any rank (per conv group, like :func:`gptq_grouped`)."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    if getattr(spec, "granularity", None) in ("per_channel", "per_group"):
        return rtn(w2, make_grid(spec))[0].reshape(w.shape)  # row-wise grids: the groups need no split
    rows = w2.shape[0] // groups
    return torch.cat([rtn(w2[g * rows:(g + 1) * rows], make_grid(spec))[0] for g in range(groups)]).reshape(w.shape)


def gptq_or_rtn(w: Tensor, hess: FoldedHessian, spec, cfg: GPTQConfig = GPTQConfig()):
    """GPTQ if it beats round-to-nearest on calibration data it was not fitted on, else ``None``.

    Returns ``(q, params or None, stats)``: with two folds, GPTQ fitted on each fold is scored on the
    other (2-fold cross-validation of the output error) against round-to-nearest on the same rows; the
    winner is refitted on all rows. With a single calibration sample the comparison is on that sample."""
    q_rtn = rtn_grouped(w, hess.groups, spec)
    if hess.cross_validates:
        a, b = hess.folds
        held = sum(quadratic_error(w, gptq_grouped(w, fit, spec, cfg)[0], score, energy=False)[0]
                   for fit, score in ((a, b), (b, a)))
        held_rtn = sum(quadratic_error(w, q_rtn, f, energy=False)[0] for f in (a, b))
    q, params = gptq_grouped(w, hess, spec, cfg)
    err, sig = quadratic_error(w, q, hess)
    err_rtn = quadratic_error(w, q_rtn, hess, energy=False)[0]
    if not hess.cross_validates:
        held, held_rtn = err, err_rtn
    stats = {"rel_error": err / sig, "rtn_rel_error": err_rtn / sig, "heldout_rel_error": held / (2 * sig),
             "heldout_rtn_rel_error": held_rtn / (2 * sig), "calibration_rows": hess.rows}
    if held < held_rtn:
        return q, params, {"algorithm": "gptq", **stats}
    stats.update(rel_error=err_rtn / sig,
                 reason="kept round-to-nearest: GPTQ's output error on held-out calibration rows was higher")
    return q_rtn, None, {"algorithm": "rtn", **stats}


def gptq_grouped(w: Tensor, hess: Hessian, spec, cfg: GPTQConfig = GPTQConfig()):
    """GPTQ of a conv / linear weight of any rank: rows ``[out, in * kh * kw]``, one Hessian per conv group."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    rows = w2.shape[0] // hess.groups
    outs, params = [], []
    for gi in range(hess.groups):
        q, p = gptq(w2[gi * rows:(gi + 1) * rows], hess.matrix(gi), make_grid(spec), cfg)
        outs.append(q)
        params.append(p)
    return torch.cat(outs).reshape(w.shape), _concat_params(params)


def _concat_params(params: list):
    if len(params) == 1:
        return params[0]
    p0 = params[0]
    if isinstance(p0, QParams) and p0.axis is None and p0.group_size is None:
        raise ValueError("grouped GPTQ needs per-channel or per-group weight parameters")
    cat = lambda attr: torch.cat([getattr(p, attr) for p in params])  # noqa: E731
    if isinstance(p0, QParams):
        return replace(p0, scale=cat("scale"), zero_point=cat("zero_point"))
    raise ValueError("grouped convolutions with NF4 weights are not supported")
