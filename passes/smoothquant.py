"""SmoothQuant (Xiao et al., 2023) for linear layers fed by a LayerNorm.

Transformer activations have a few channels far larger than the rest; with per-tensor int8 activations
those channels set the step and the others lose most of their bits. For ``y = W x`` the per-input-channel
factor ``s`` (``x' = x / s``, ``W' = W diag(s)``) leaves ``y`` unchanged and moves range from the
activation into the weight, which has per-channel scales to absorb it.
``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)``.

Where ``x`` is a LayerNorm output, ``1 / s`` folds into the LayerNorm's weight and bias: no run-time
cost. A post-LN block (BERT) also feeds that LayerNorm output into its residual add; there a float
``mul(x', s)`` on the residual edge restores the residual stream exactly (one element-wise op, named
in the report). ``alpha`` is chosen per LayerNorm, from {0.3, ..., 0.8}, as the one whose simulated
int8 (per-tensor activation, per-channel weight) output error on calibration tokens is lowest; 0 (no
smoothing) is kept when nothing beats it. Float output is unchanged up to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile import meta
from qcompile.ir import add_constant, get_attr_value

from .calibration_stats import runner
from .infra import Pass, PassResult
from .weight_only import _set_attr

aten = torch.ops.aten
SMOOTHQUANT = meta.SMOOTHQUANT.name  # gm.meta: report of the pass (compatibility name)
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MAX_TOKENS = 4096  # calibration rows kept per LayerNorm for choosing alpha


@dataclass
class Group:
    norm: fx.Node
    value: fx.Node           # the node the linears read (the LayerNorm or its observer)
    linears: list
    others: list             # non-linear users of the LayerNorm output (residual adds)


def _const(gm, node):
    return isinstance(node, fx.Node) and node.op == "get_attr" and isinstance(get_attr_value(gm, node), torch.Tensor)


def find_groups(gm: fx.GraphModule) -> tuple[list[Group], list[dict]]:
    """LayerNorms (affine, over the last dim) whose output feeds constant-weight linears."""
    observers = set(meta.OBSERVED.get(gm, {}))
    groups, skipped = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.layer_norm.default:
            continue
        if len(node.args) < 4 or not (_const(gm, node.args[2]) and _const(gm, node.args[3])):
            continue
        users = []
        for u in node.users:
            users += list(u.users) if u.op == "call_module" and u.target in observers else [u]
        linears = [u for u in users if u.target == aten.linear.default and _const(gm, u.args[1])
                   and len(u.args[1].users) == 1]
        if not linears:
            continue
        others = [u for u in users if u not in linears]
        if any(u.target != aten.add.Tensor for u in others):
            skipped.append({"norm": node.name, "reason": "its output also feeds "
                            + ", ".join(sorted({str(getattr(u.target, '__name__', u.target)) for u in others}))})
            continue
        groups.append(Group(node, node, linears, others))
    return groups, skipped


def _collect_rows(gm, groups, samples) -> dict[str, torch.Tensor]:
    """Up to MAX_TOKENS rows of every group's LayerNorm output over the calibration samples."""
    run = runner(gm)
    by_name = {n.name: n for n in run.graph.nodes}
    rows: dict[str, list] = {g.norm.name: [] for g in groups}

    def keep(name):
        def tap(x):
            kept = sum(r.shape[0] for r in rows[name])
            if kept < MAX_TOKENS:
                rows[name].append(x.detach().reshape(-1, x.shape[-1])[:MAX_TOKENS - kept].double())
            return x
        return tap

    for g in groups:
        node = by_name[g.norm.name]
        with run.graph.inserting_after(node):
            call = run.graph.call_function(keep(g.norm.name), (node,))
        node.replace_all_uses_with(call, delete_user_cb=lambda u, c=call: u is not c)
    run.recompile()
    with torch.no_grad():
        for args, kwargs in samples:
            run(*args, **kwargs)
    return {k: torch.cat(v) for k, v in rows.items() if v}


def _fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = max(hi - lo, 1e-12) / 255
    zp = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale


def _fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def _error(x, weights, s) -> float:
    xq = _fake_quant_act(x / s)
    return sum(float(((xq @ _fake_quant_weight(w * s).T) - x @ w.T).pow(2).mean()) for w in weights)


def choose_alpha(x: torch.Tensor, weights: list) -> tuple[float, torch.Tensor, float, float]:
    """(alpha, s, error with s, error without) for one group; alpha 0 / s = 1 when smoothing does not help."""
    xmax = x.abs().amax(0).clamp_min(1e-5)
    wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp_min(1e-5)
    base = _error(x, weights, torch.ones_like(xmax))
    best = (0.0, torch.ones_like(xmax), base)
    for alpha in ALPHAS:
        s = (xmax.pow(alpha) / wmax.pow(1 - alpha)).clamp(1e-2, 1e2)
        err = _error(x, weights, s)
        if err < best[2]:
            best = (alpha, s, err)
    return best[0], best[1], best[2], base


class SmoothQuant(Pass):
    """Apply SmoothQuant to every LayerNorm -> linear group of a prepared graph (see module doc)."""

    def __init__(self, samples):
        self.samples = samples

    def call(self, gm: fx.GraphModule) -> PassResult:
        groups, skipped = find_groups(gm)
        rows = _collect_rows(gm, groups, self.samples) if groups else {}
        report = {"groups": [], "skipped": skipped}
        for g in groups:
            x = rows.get(g.norm.name)
            if x is None:
                continue
            weights = [get_attr_value(gm, lin.args[1]).detach().double() for lin in g.linears]
            alpha, s, err, base = choose_alpha(x, weights)
            entry = {"norm": g.norm.name, "linears": [lin.name for lin in g.linears], "alpha": alpha,
                     "sim_error_ratio": round(err / base, 4) if base > 0 else 1.0, "residual_muls": 0}
            if alpha > 0:
                self._apply(gm, g, s)
                entry["residual_muls"] = len(g.others)
            report["groups"].append(entry)
        meta.SMOOTHQUANT.set(gm, report)
        modified = any(e["alpha"] > 0 for e in report["groups"])
        if modified:
            gm.recompile()
        return PassResult(gm, modified)

    def _apply(self, gm, g: Group, s: torch.Tensor) -> None:
        meta.SMOOTHQUANT_SCALES.setdefault(gm, {})[g.norm.name] = s.float()
        for i in (2, 3):  # LayerNorm weight and bias: x' = x / s
            v = get_attr_value(gm, g.norm.args[i])
            _set_attr(gm, g.norm.args[i].target, (v.double() / s).to(v.dtype))
        for lin in g.linears:  # W' = W diag(s)
            w = get_attr_value(gm, lin.args[1])
            _set_attr(gm, lin.args[1].target, (w.double() * s).to(w.dtype))
        for user in g.others:  # post-LN residual: x = x' * s, in float
            scale = add_constant(gm, f"{g.norm.name}_smooth_scale", s.to(torch.float32), user)
            with gm.graph.inserting_before(user):
                mul = gm.graph.call_function(aten.mul.Tensor, (g.norm, scale))
            mul.meta.update({k: v for k, v in g.norm.meta.items() if k != "val"})
            mul.meta["val"] = g.norm.meta.get("val")
            user.replace_input_with(g.norm, mul)
            for obs in [u for u in g.norm.users if u.op == "call_module"]:
                user.replace_input_with(obs, mul)
