"""Learned weight rounding: AdaRound (Nagel et al., "Up or Down? Adaptive Rounding", 2020).

Each weight is rounded down or up (not to nearest) so that the layer's *output* on calibration data
moves least. Per layer a continuous variable ``V`` per weight gives a soft rounding
``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``; Adam minimises

    tr(D H D^T) / tr(W H W^T) + lambda * sum(1 - |2 h - 1|^beta),     D = W - s (floor(W/s) + h - z ...)

where ``H = X^T X`` is the layer's input Gram matrix on the calibration rows (exactly the mean squared
output error, so no activations are kept: memory ``K x K`` per conv group, shared with GPTQ's runner),
and ``beta`` anneals from 20 to 2 so ``h`` ends at 0 or 1. Layers are visited in order as in
``passes/weight_only.py`` (later layers see earlier layers already rounded).

Bounded on CPU: ``iterations`` per layer, early stop once every ``h`` is within 1e-3 of 0 or 1 after
the warm-up, a total ``time_limit_s`` after which the remaining layers keep round-to-nearest, and a
progress bar. A layer keeps round-to-nearest unless learned rounding gives the lower output error on
the calibration rows (``cross_validate=True``: on the calibration half it was not fitted on, as GPTQ).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
from torch import fx

from qcompile import meta
from qcompile.gptq import FoldedHessian, breaks_pair_bound, quadratic_error, rtn_grouped
from qcompile.ir import get_attr_value
from qcompile.observers import weight_qparams
from qcompile.qparams import dequantize, quantize
from qcompile.specs import QParams, QuantSpec

from .weight_only import GPTQRounding, _runner, _set_attr, rounds, weighted_layers

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundConfig:
    iterations: int = 300
    lr: float = 3e-2
    reg_weight: float = 0.01
    beta: tuple = (20.0, 2.0)
    warmup: float = 0.2        # fraction of iterations without the rounding regularizer
    time_limit_s: float = 900.0
    cross_validate: bool = False  # True: fit on each calibration half, score on the other (3x the time)


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _grid(w: torch.Tensor, qp: QParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scale, zero point broadcast to ``w`` (per-tensor / per-channel axis 0)."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    s = qp.scale.float().reshape(shape) if qp.scale.numel() > 1 else qp.scale.float().reshape(())
    z = qp.zero_point.float().reshape(shape) if qp.zero_point.numel() > 1 else qp.zero_point.float().reshape(())
    return s, z, torch.floor(w / s)


def _soft(w_floor, h, s, z, qp):
    return (torch.clamp(w_floor + h + z, qp.quant_min, qp.quant_max) - z) * s


def _loss_parts(d2: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
    """``tr(D H D^T)`` with ``D [N, K]`` split into conv groups, ``hs [G, Kg, Kg]``."""
    g = hs.shape[0]
    dg = d2.reshape(g, d2.shape[0] // g, -1)
    return torch.einsum("gnk,gkl,gnl->", dg, hs, dg)


def adaround_weight(w: torch.Tensor, hs: torch.Tensor, qp: QParams, cfg: AdaRoundConfig) -> tuple[torch.Tensor, dict]:
    """Learned rounding of ``w`` on the grid ``qp`` for input Gram matrices ``hs [G, Kg, Kg]``."""
    w = w.detach().float()
    s, z, w_floor = _grid(w, qp)
    rest = (w / s - w_floor).clamp(0.01, 0.99)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    n = w.shape[0]
    sig = _loss_parts(w.reshape(n, -1), hs).clamp_min(1e-30).detach()
    warm = int(cfg.warmup * cfg.iterations)
    it = 0
    for it in range(cfg.iterations):
        d = (w - _soft(w_floor, _h(v), s, z, qp)).reshape(n, -1)
        loss = _loss_parts(d, hs) / sig
        if it >= warm:
            frac = (it - warm) / max(cfg.iterations - warm, 1)
            beta = cfg.beta[0] + (cfg.beta[1] - cfg.beta[0]) * frac
            loss = loss + cfg.reg_weight * (1 - (2 * _h(v) - 1).abs().pow(beta)).sum() / w.numel()
            if it % 20 == 0 and bool(((_h(v) < 1e-3) | (_h(v) > 1 - 1e-3)).all()):
                break
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        q = _soft(w_floor, (_h(v) >= 0.5).float(), s, z, qp)
    return q, {"iterations": it + 1}


class AdaRound(GPTQRounding):
    """AdaRound every annotated per-tensor / per-channel linear / conv2d weight of a prepared graph."""

    def __init__(self, config: AdaRoundConfig = AdaRoundConfig(), progress=None):
        self.config, self.progress = config, progress

    def __call__(self, gm: fx.GraphModule, samples) -> dict:
        from tqdm.auto import tqdm
        runner = _runner(gm)
        # upstream: the float weights' runner, made before any layer is rounded (it keeps the original tensors)
        reference = _runner(gm) if getattr(self.config, "upstream", False) else None
        stats = meta.WEIGHT_ROUNDING.setdefault(gm, {})
        nodes = {n.name: n for n in gm.graph.nodes}
        layers = [lay for lay in weighted_layers(gm) if isinstance(lay.spec, QuantSpec)
                  and lay.spec.granularity in ("per_tensor", "per_channel") and self._wants(lay, nodes)]
        t0 = time.perf_counter()
        bar = tqdm(total=len(layers), desc=f"{self.name} rounding", disable=self.progress is False if
                   self.progress is not None else None, leave=False)
        limit = getattr(self.config, "max_samples", None)
        if limit is not None:
            samples = list(itertools.islice(samples, limit))  # every round runs them again: a bounded cost
        for group in rounds(gm, layers):
            over = time.perf_counter() - t0 > self.config.time_limit_s
            hessians = {} if over else self._collect(runner, group, samples, reference)
            for layer in group:
                bar.update(1)
                if over:
                    stats[layer.name] = {"algorithm": "rtn", "reason": "time limit reached"}
                    continue
                w_node = nodes[layer.weight]
                w = get_attr_value(gm, w_node).detach().float()
                q, qp, stats[layer.name] = self._layer(w, hessians[layer.tap_key], layer.spec)
                if qp is None:  # round-to-nearest kept: convert rounds the float weight
                    if reference is not None:  # the later layers' inputs are measured against the rounded graph
                        _set_attr(runner, w_node.target, q.to(w.dtype))
                    continue
                for mod in (gm, runner):
                    _set_attr(mod, w_node.target, q.to(w.dtype))
                meta.WEIGHT_QPARAMS.set(w_node, qp)
        bar.close()
        return stats

    name = "adaround"

    def _wants(self, layer, nodes: dict) -> bool:
        return True

    def _fit(self, w: torch.Tensor, hess, qp: QParams):
        return adaround_weight(w, hess.matrices().float(), qp, self.config)

    def _layer(self, w: torch.Tensor, hess: FoldedHessian, spec: QuantSpec):
        cfg, qp = self.config, weight_qparams(w, spec)
        q_rtn = rtn_grouped(w, hess.groups, spec)
        if cfg.cross_validate and hess.cross_validates:
            a, b = hess.folds
            held = sum(quadratic_error(w, self._fit(w, fit, qp)[0], score, energy=False)[0]
                       for fit, score in ((a, b), (b, a)))
            held_rtn = sum(quadratic_error(w, q_rtn, f, energy=False)[0] for f in (a, b))
        q, info = self._fit(w, hess, qp)
        err, sig = quadratic_error(w, q, hess)
        err_rtn = quadratic_error(w, q_rtn, hess, energy=False)[0]
        if not (cfg.cross_validate and hess.cross_validates):
            held, held_rtn = err, err_rtn
        st = {"rel_error": err / sig, "rtn_rel_error": err_rtn / sig, "heldout_rel_error": held / (2 * sig),
              "heldout_rtn_rel_error": held_rtn / (2 * sig), "calibration_rows": hess.rows, **info}
        if held < held_rtn and breaks_pair_bound(q, qp, spec):
            st["reason"] = "kept round-to-nearest: its rounding put two same-sign codes past the int16 pair bound"
        elif held < held_rtn:
            q = dequantize(quantize(q, qp), qp)  # exactly on the grid convert reproduces
            return q, qp, {"algorithm": self.name, **st}
        st.setdefault("reason", "kept round-to-nearest: learned rounding's output error on held-out calibration "
                                "rows was higher")
        st.update(rel_error=err_rtn / sig)
        return q_rtn, None, {"algorithm": "rtn", **st}


# -- greedy rounding: a local search on the same objective ------------------------------------------
@dataclass(frozen=True)
class GreedyRoundingConfig:
    """max_flips: per row (the search stops earlier once no flip lowers the error). spatial_only: only convs
    with a kernel larger than 1x1 -- where neighbouring input pixels are alike and the sum of a kernel's
    rounding errors is what the output sees; cheap there (a kernel slice has 9-49 taps), while a transformer's
    linears (K = 384..1536) gained 4e-6 of cosine for 4x the compile time (``SPATIAL_GREEDY``)."""
    max_flips: int = 512
    time_limit_s: float = 900.0
    cross_validate: bool = True   # cheap: fit on each calibration half, keep it only where it wins on the other
    spatial_only: bool = False
    max_weights: int | None = None  # skip layers with more weights (each step touches all of them)
    # the first max_samples calibration samples only (None: all): each round of layers runs them through the
    # graph up to its layers again, so the forward passes cost rounds x samples
    max_samples: int | None = None
    # fit Q x to the float model's W x_float (the earlier layers' rounding error included), not to W x
    upstream: bool = False


SPATIAL_GREEDY = GreedyRoundingConfig(spatial_only=True, max_weights=1 << 20)  # convs with spatial kernels only
# the default for weights wider than 4 bits (qcompile.algorithms.default_set): the first 8 calibration samples, at
# most 64 flips per row. EfficientNet-Lite2, 32 calibration crops, x86: compile 12 s without it, 68 s on all 32
# crops, 25-31 s on 8, 23.6 s with 64 flips (logit SQNR 16.7-16.8 dB in all three); ResNet-18 at 224 px (8 x 4
# images): 5 s without it, 93 s with 512 flips, 38 s with 64 (27 s since each step is one fused pass and the
# held-out scores skip the energy term: the same bits). Conformance MobileNetV2, ViT, Whisper, RegNet and
# Mistral: the same SQNR with 64 flips as with 512 (their rows stop earlier). Collecting several rounds'
# Hessians in one forward pass (the later layers seeing the earlier ones unrounded) was cheaper still and lost
# 1.0 dB on the conformance MobileNetV2, where strictly sequential rounds gained 0.7: the earlier layers'
# rounding moves the later layers' Hessians by 1-3 %.
GREEDY_8BIT = GreedyRoundingConfig(max_samples=8, max_flips=64)


def greedy_weight(w: torch.Tensor, hs: torch.Tensor, qp: QParams, max_flips: int = 4096,
                  cs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Round-to-nearest, then flip single weights to their other neighbour while a flip lowers the layer's
    output error ``tr(D H D^T)`` (``hs [G, Kg, Kg]`` per conv group), the best flip of every row at a time,
    each weight at most once. Exact steepest descent on the AdaRound objective over the same up/down choices:
    the error never rises, and on inputs whose neighbouring pixels are alike (an image stem: ``H`` close to
    ``1 1^T`` per input channel) it finds what round-to-nearest misses, that the sum of a kernel's rounding
    errors is what the output sees.

    ``cs [G, Kg, Kg]``: the cross term ``sum(x_float x^T)`` of :class:`qcompile.gptq.Hessian`; the error is
    then ``|Q x - W x_float|^2``, the earlier layers' error included (AdaRound's asymmetric reconstruction):
    its gradient is ``W C - Q H`` where the symmetric one is ``(W - Q) H``."""
    w = w.detach().float()
    s, z, _ = _grid(w, qp)
    n, g = w.shape[0], hs.shape[0]
    v = (w / s).reshape(n, -1) if s.dim() == 0 else (w / s).reshape(n, -1)
    zz = z.reshape(-1, 1).expand(n, 1) if z.dim() else z
    q = (torch.round(v + zz).clamp(qp.quant_min, qp.quant_max) - zz)
    kg = v.shape[1]
    d = (v - q).reshape(g, n // g, kg)
    qg = q.reshape(g, n // g, kg).clone()
    lo = (qp.quant_min - zz).reshape(g, n // g, 1) if torch.is_tensor(zz) and zz.dim() else qp.quant_min - zz
    hi = (qp.quant_max - zz).reshape(g, n // g, 1) if torch.is_tensor(zz) and zz.dim() else qp.quant_max - zz
    t = torch.sign(d)  # the other neighbour: up where we rounded down
    ok = (t != 0) & (qg + t >= lo) & (qg + t <= hi)
    hs = hs.float()
    if cs is None:
        grad = torch.einsum("grk,gkl->grl", d, hs)
    else:  # v C - q H, in grid units like d
        grad = (torch.einsum("grk,gkl->grl", v.reshape(g, n // g, kg), cs.float())
                - torch.einsum("grk,gkl->grl", qg, hs))
    # delta = where(ok, diag - 2 t grad, inf) as one fused pass per step: diag_m is diag where a flip is left and
    # inf elsewhere (inf + finite = inf); -2 t grad is exact (t is 0 or +-1), so the values are the same bits
    diag = torch.diagonal(hs, dim1=1, dim2=2)[:, None, :]
    diag_m = torch.where(ok, diag.expand_as(grad), torch.full_like(grad, float("inf")))
    t2 = -2 * t
    gi = torch.arange(g)[:, None].expand(g, n // g)
    inf, flips = torch.tensor(float("inf")), 0
    for _ in range(min(max_flips, kg)):
        best, k = torch.addcmul(diag_m, t2, grad).min(dim=2)
        scale = (d * grad).sum(2).abs().clamp_min(1e-30)
        move = best < -1e-9 * scale
        if not bool(move.any()):
            break
        kk = k[..., None]
        tk = torch.where(move, torch.gather(t, 2, kk)[..., 0], torch.zeros_like(best))
        d.scatter_add_(2, kk, -tk[..., None])
        qg.scatter_add_(2, kk, tk[..., None])
        grad.addcmul_(tk[..., None], hs[gi, k], value=-1)  # tk is 0 or +-1: the product is exact, as before
        # a weight flips once: no move is left for it
        diag_m.scatter_(2, kk, torch.where(move[..., None], inf, diag_m.gather(2, kk)))
        flips += int(move.sum())
    out = (qg.reshape(n, kg) * (s.reshape(-1, 1) if s.dim() else s)).reshape(w.shape)
    return out, {"flips": flips}


class GreedyRounding(AdaRound):
    """:func:`greedy_weight` for every annotated per-tensor / per-channel linear / conv2d weight, kept per
    layer only where it beats round-to-nearest on calibration rows it was not fitted on."""

    name = "greedy_rounding"

    def __init__(self, config: GreedyRoundingConfig = GreedyRoundingConfig(), progress=None):
        super().__init__(config, progress)

    def _wants(self, layer, nodes: dict) -> bool:
        cfg = self.config
        if cfg.spatial_only and not (layer.conv is not None and any(k > 1 for k in layer.conv.kernel_size)):
            return False
        w = nodes[layer.weight]
        return cfg.max_weights is None or get_attr_value(w.graph.owning_module, w).numel() <= cfg.max_weights

    def _fit(self, w: torch.Tensor, hess, qp: QParams):
        cross = hess.cross_matrices()
        return greedy_weight(w, hess.matrices().float(), qp, self.config.max_flips,
                             None if cross is None else cross[0].float())
