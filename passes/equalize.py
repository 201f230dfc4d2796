"""Cross-layer equalization and high-bias absorption (Nagel et al., "Data-Free Quantization", 2019).

For two layers in a row, ``y = W2 act(W1 x + b1) + b2``, with ``act`` ReLU (positively homogeneous)
or none, scaling output channel ``i`` of the first layer by ``1 / s_i`` and input channel ``i`` of the
second by ``s_i`` leaves the float output unchanged. ``s_i = sqrt(r1_i / r2_i)`` (``r`` the channel's
weight range) makes both ranges ``sqrt(r1_i r2_i)``: per-channel weight ranges equal across the pair,
so per-tensor weights (and the intermediate per-tensor activation) lose less to the widest channel.
Pairs are conv -> conv, conv -> depthwise conv, depthwise -> conv and linear -> linear, chained
(conv -> depthwise -> conv is two overlapping pairs, iterated to a fixed point as in the paper).

ReLU6 (``hardtanh(0, 6)``) is not positively homogeneous: its clip would move to ``6 / s_i``. With
calibration statistics of the first layer's output, a channel whose pre-activation never reached 6
keeps an exact output on that data as long as ``s_i >= max_i / 6`` (the clip stays out of reach) and a
channel that does reach 6 is left alone (``s_i = 1``). Without statistics ReLU6 pairs are skipped.

High-bias absorption (needs the same statistics): where the pre-activation of channel ``i`` is
always ``>= c_i > 0`` on calibration data, ``c_i`` moves from ``b1`` into ``b2`` (``b2 += W2[:, i] c_i``),
shrinking the intermediate range. Skipped when the second layer pads (the border would change).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile import meta
from qcompile.ir import constant_pad_value, get_attr_value
from qcompile.ops import op_kind

from .infra import Pass, PassResult
from .weight_only import _set_attr

EQUALIZATION = meta.EQUALIZATION.name  # the key's string, for older callers


@dataclass
class Pair:
    first: fx.Node
    act: fx.Node | None   # relu / relu6 / None
    second: fx.Node
    pad: fx.Node | None = None  # a zero constant pad before the second layer (commutes with the scaling)

    @property
    def kind(self) -> str:
        return op_kind(self.act) if self.act is not None else "identity"


def _weight(gm, node: fx.Node):
    w = node.args[1] if len(node.args) > 1 else None
    if not isinstance(w, fx.Node) or w.op != "get_attr" or len(w.users) != 1:
        return None
    return w


def _groups(node: fx.Node) -> int:
    return int(node.args[6]) if op_kind(node) == "conv2d" and len(node.args) > 6 else 1


def _depthwise(gm, node: fx.Node) -> bool:
    w = get_attr_value(gm, node.args[1])
    g = _groups(node)
    return g > 1 and w.shape[1] == 1 and w.shape[0] == g


def _eligible(gm, node: fx.Node) -> bool:
    if op_kind(node) not in ("conv2d", "linear") or _weight(gm, node) is None:
        return False
    return _groups(node) == 1 or _depthwise(gm, node)


def _only_user(gm, node: fx.Node) -> fx.Node | None:
    """The single consumer of ``node``, looking through observers (the graph may be prepared)."""
    observers = meta.OBSERVED.get(gm, {})
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not (user.op == "call_module" and user.target in observers):
            return user
        node = user
    return None


def find_pairs(gm: fx.GraphModule) -> list[Pair]:
    """Layer pairs joined by a single-use path through at most one ReLU / ReLU6 and one zero pad."""
    pairs = []
    for node in gm.graph.nodes:
        if not _eligible(gm, node):
            continue
        nxt, act, pad = _only_user(gm, node), None, None
        if nxt is not None and op_kind(nxt) in ("relu", "relu6"):
            act, nxt = nxt, _only_user(gm, nxt)
        if nxt is not None and _zero_pad(nxt):
            pad, nxt = nxt, _only_user(gm, nxt)
        if nxt is not None and _eligible(gm, nxt) and op_kind(nxt) == op_kind(node):
            pairs.append(Pair(node, act, nxt, pad))
    return pairs


def _zero_pad(node: fx.Node) -> bool:
    """``pad(x, p, "constant")`` / ``constant_pad_nd(x, p, 0)``: zeros stay zeros under channel scaling."""
    return constant_pad_value(node) == 0.0


def _bias(gm, node: fx.Node, n: int) -> torch.Tensor:
    b = node.args[2] if len(node.args) > 2 else None
    return get_attr_value(gm, b).detach().float().clone() if isinstance(b, fx.Node) else torch.zeros(n)


def _set_bias(gm, node: fx.Node, value: torch.Tensor) -> None:
    b = node.args[2] if len(node.args) > 2 else None
    if isinstance(b, fx.Node) and b.op == "get_attr" and len(b.users) == 1:
        _set_attr(gm, b.target, value)
        return
    from qcompile.ir import add_constant
    args = list(node.args) + [None] * max(0, 3 - len(node.args))
    args[2] = add_constant(gm, f"{node.name}_bias_eq", value, node)
    node.args = tuple(args)


def _in_dim(gm, node: fx.Node) -> int:
    """The dim of the second layer's weight that indexes its input channels."""
    return 0 if _depthwise(gm, node) else 1


def _ranges(gm, pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    w1 = get_attr_value(gm, pair.first.args[1]).detach().float()
    w2 = get_attr_value(gm, pair.second.args[1]).detach().float()
    r1 = w1.abs().reshape(w1.shape[0], -1).amax(1)
    r2 = w2.abs().movedim(_in_dim(gm, pair.second), 0).reshape(w1.shape[0], -1).amax(1)
    return r1, r2


def _scales(r1: torch.Tensor, r2: torch.Tensor, pair: Pair, stats) -> torch.Tensor | None:
    """Per-channel ``s`` (first layer's channel i divided by ``s_i``), or None to skip the pair."""
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, (r1 / r2.clamp_min(1e-30)).sqrt(), torch.ones_like(r1)).clamp(1e-4, 1e4)
    if pair.kind != "relu6":
        return s
    if stats is None:
        return None
    mx = stats.max.float()
    clipped = mx >= 6.0
    s = torch.maximum(s, mx.clamp_min(0) / 6.0)  # the new clip 6 * s_i (original units) stays above the data
    return torch.where(clipped, torch.ones_like(s), s)


def scale_pair(gm: fx.GraphModule, pair: Pair, s: torch.Tensor) -> None:
    """Divide channel i of the first layer (weight rows, bias) by ``s_i``, multiply the second's inputs."""
    w1n, w2n = pair.first.args[1], pair.second.args[1]
    w1, w2 = get_attr_value(gm, w1n).detach().float(), get_attr_value(gm, w2n).detach().float()
    view1 = (-1,) + (1,) * (w1.dim() - 1)
    dim = _in_dim(gm, pair.second)
    view2 = [1] * w2.dim()
    view2[dim] = -1
    _set_attr(gm, w1n.target, (w1 / s.view(view1)).to(w1.dtype))
    _set_bias(gm, pair.first, _bias(gm, pair.first, w1.shape[0]) / s)
    _set_attr(gm, w2n.target, (w2 * s.view(view2)).to(w2.dtype))


def absorb_high_bias(gm: fx.GraphModule, pair: Pair, stats, s: torch.Tensor) -> int:
    """Move ``c_i = min pre-activation > 0`` from the first bias into the second; returns channels moved."""
    if stats is None or pair.kind == "identity" or pair.pad is not None or _pads(pair.second):
        return 0
    c = (stats.min.float() / s).clamp_min(0.0)
    if pair.kind == "relu6":
        c = torch.where(stats.max.float() / s < 6.0, c, torch.zeros_like(c))
    if not bool((c > 0).any()):
        return 0
    w2 = get_attr_value(gm, pair.second.args[1]).detach().float()
    n_out = w2.shape[0]
    if _depthwise(gm, pair.second):
        shift = w2.reshape(n_out, -1).sum(1) * c
    else:
        shift = (w2.sum(dim=tuple(range(2, w2.dim()))) if w2.dim() > 2 else w2) @ c
    _set_bias(gm, pair.first, _bias(gm, pair.first, c.numel()) - c)
    _set_bias(gm, pair.second, _bias(gm, pair.second, n_out) + shift)
    return int((c > 0).sum())


def _pads(node: fx.Node) -> bool:
    if op_kind(node) != "conv2d":
        return False
    pad = node.args[4] if len(node.args) > 4 else (0, 0)
    return any(int(p) != 0 for p in pad)


class CrossLayerEqualization(Pass):
    """Equalize every pair (``iterations`` sweeps), then absorb high biases.

    ``stats``: ``{first layer node name: calibration_stats.Stats}`` of first-layer outputs (needed for
    ReLU6 pairs and bias absorption; see :func:`stats_nodes`)."""

    def __init__(self, stats: dict | None = None, iterations: int = 4, absorb: bool = True):
        self.stats, self.iterations, self.absorb = stats or {}, iterations, absorb

    def call(self, gm: fx.GraphModule) -> PassResult:
        pairs = find_pairs(gm)
        total = {p.first.name: torch.ones(get_attr_value(gm, p.first.args[1]).shape[0]) for p in pairs}
        report = {"pairs": [], "skipped": []}
        for _ in range(self.iterations):
            for p in pairs:
                st = self.stats.get(p.first.name)
                s = _scales(*_ranges(gm, p), p, _rescaled(st, total[p.first.name]))
                if s is None:
                    continue
                scale_pair(gm, p, s)
                total[p.first.name] = total[p.first.name] * s
        for p in pairs:
            st = self.stats.get(p.first.name)
            if p.kind == "relu6" and st is None:
                report["skipped"].append({"first": p.first.name, "second": p.second.name,
                                          "reason": "ReLU6 between them and no calibration statistics"})
                continue
            moved = absorb_high_bias(gm, p, st, total[p.first.name]) if self.absorb else 0
            s = total[p.first.name]
            report["pairs"].append({"first": p.first.name, "second": p.second.name, "activation": p.kind,
                                    "scale_min": float(s.min()), "scale_max": float(s.max()),
                                    "bias_absorbed_channels": moved})
        meta.EQUALIZATION.set(gm, report)
        gm.recompile()
        return PassResult(gm, bool(report["pairs"]))


def _rescaled(stats, s: torch.Tensor):
    """The stats of the first layer's output after it was divided by ``s`` (they were taken before)."""
    if stats is None:
        return None
    from .calibration_stats import Stats
    out = Stats(stats.min / s.double(), stats.max / s.double(), None, stats.count)
    return out


def stats_axes(gm: fx.GraphModule) -> dict[str, int]:
    """Channel dims of :func:`stats_nodes` a conv would not guess: a linear's output has them last."""
    return {p.first.name: -1 for p in find_pairs(gm) if p.kind != "identity" and op_kind(p.first) == "linear"}


def stats_nodes(gm: fx.GraphModule) -> list[str]:
    """The nodes whose calibration statistics CrossLayerEqualization uses (first layers of pairs)."""
    return [p.first.name for p in find_pairs(gm) if p.kind != "identity"]
