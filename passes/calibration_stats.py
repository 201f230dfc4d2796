"""Per-channel statistics of chosen values of a prepared graph on calibration data.

The accuracy passes (equalization, bias correction, SmoothQuant, learned rounding) need to know what
flows through a few nodes: per-channel min / max / mean, absolute maxima, or the mean input map of a
conv. :func:`collect` runs the samples through a copy of the graph without observers (sharing its
constants) with taps after the requested nodes; memory is one running statistic per tapped value.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from qcompile import meta



def channel_axis(x: torch.Tensor) -> int:
    """Channels of a conv activation (``[N, C, H, W]``) are dim 1; of a linear activation the last."""
    return 1 if x.dim() == 4 else x.dim() - 1


@dataclass
class Stats:
    """Running per-channel statistics of one value (float64)."""

    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    sum: torch.Tensor | None = None
    count: int = 0
    map_sum: torch.Tensor | None = None  # conv inputs: sum over the batch of the [C, H, W] maps
    map_count: int = 0
    extra: dict = field(default_factory=dict)
    axis: int | None = None  # the channel dim; None: channel_axis (a 4-D value read as a conv's NCHW)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        ax = channel_axis(x) if self.axis is None else self.axis % x.dim()
        rows = x.movedim(ax, -1).reshape(-1, x.shape[ax])
        mn, mx = rows.amin(0), rows.amax(0)
        self.min = mn if self.min is None else torch.minimum(self.min, mn)
        self.max = mx if self.max is None else torch.maximum(self.max, mx)
        self.sum = rows.sum(0) if self.sum is None else self.sum + rows.sum(0)
        self.count += rows.shape[0]
        if x.dim() == 4 and ax == 1:
            m = x.sum(0)
            if self.map_sum is None or self.map_sum.shape == m.shape:
                self.map_sum = m if self.map_sum is None else self.map_sum + m
                self.map_count += x.shape[0]
            else:  # spatial size changed between samples: fall back to the channel mean
                self.map_sum, self.map_count = None, -1

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.min.abs(), self.max.abs())

    @property
    def mean_map(self) -> torch.Tensor | None:
        return self.map_sum / self.map_count if self.map_sum is not None and self.map_count > 0 else None


class _Tap(nn.Module):
    def __init__(self, stats: Stats):
        super().__init__()
        self.stats = stats

    def forward(self, x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            self.stats.add(x)
        return x


def runner(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph without observers, sharing gm's constants."""
    graph = copy.deepcopy(gm.graph)
    observers = set(meta.OBSERVED.get(gm, {}))
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in observers:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    return fx.GraphModule(gm, graph)


def collect(gm: fx.GraphModule, names, samples, axes: dict | None = None) -> dict[str, Stats]:
    """``{node name: Stats}`` of the outputs of nodes ``names`` over ``samples`` (``(args, kwargs)`` pairs).
    ``axes``: {node name: channel dim} where it is not :func:`channel_axis`'s guess, e.g. -1 for a 4-D value a
    linear reads (ConvNeXt's channels-last MLP)."""
    run = runner(gm)
    by_name = {n.name: n for n in run.graph.nodes}
    stats = {}
    for i, name in enumerate(dict.fromkeys(names)):
        stats[name] = Stats(axis=(axes or {}).get(name))
        tap = f"_stats_tap_{i}"
        run.add_submodule(tap, _Tap(stats[name]))
        with run.graph.inserting_after(by_name[name]):
            call = run.graph.call_module(tap, (by_name[name],))
        by_name[name].replace_all_uses_with(call, delete_user_cb=lambda u, c=call: u is not c)
    run.recompile()
    with torch.no_grad():
        for args, kwargs in samples:
            run(*args, **kwargs)
    return stats
