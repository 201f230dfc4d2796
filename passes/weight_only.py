"""Calibration-driven weight rounding (GPTQ) on a prepared graph, layer by layer.

Sequential GPTQ: the layers with annotated weights (linear, conv2d) are visited in topological
order, in *rounds* of layers that do not feed each other (Q/K/V of an attention block share one
round, and one Hessian since they read the same input). For each round, the calibration samples are
run through a copy of the graph *up to the last layer input needed* (taps raise to stop the forward
early), the Hessian of each input is accumulated (``K x K`` memory, activations are never kept),
and each weight is replaced by its GPTQ rounding -- unless round-to-nearest gives the lower output
error on calibration samples GPTQ was not fitted on (2-fold cross-validation, ``qcompile.gptq.gptq_or_rtn``):
then the layer keeps round-to-nearest and the report says so. Later rounds therefore see the already-quantized
earlier layers, as in the GPTQ paper; memory stays bounded by one round's Hessians.

The result is written where convert reads it: the weight constant holds the on-grid values and the
weight node's ``WEIGHT_QPARAMS`` meta the parameters, so convert recovers the exact integer codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from qcompile import meta
from qcompile import annotation as A
from qcompile.gptq import ConvGeometry, FoldedHessian, GPTQConfig, breaks_pair_bound, gptq_or_rtn
from qcompile.ir import get_attr_value
from qcompile.ops import op_kind
from qcompile.specs import NF4Spec, QuantSpec

from .calibration_stats import runner as _runner

ROUNDING = meta.WEIGHT_ROUNDING.name  # the key's string, for qcompile.api (reads ref.meta[ROUNDING])


@dataclass
class Layer:
    name: str        # the linear / conv node
    act: str         # its activation input node
    weight: str      # its weight get_attr node
    spec: object     # QuantSpec | NF4Spec
    conv: ConvGeometry | None = None

    @property
    def tap_key(self):
        return (self.act, self.conv)


def _geometry(node: fx.Node, w: torch.Tensor) -> ConvGeometry:
    get = lambda i, d: tuple(node.args[i]) if len(node.args) > i else d  # noqa: E731
    groups = int(node.args[6]) if len(node.args) > 6 else 1
    return ConvGeometry(tuple(w.shape[2:]), get(3, (1, 1)), get(4, (0, 0)), get(5, (1, 1)), groups)


def weighted_layers(gm: fx.GraphModule) -> list[Layer]:
    """Linear / conv2d nodes whose weight constant carries a weight spec, in graph order."""
    layers, observers = [], set(meta.OBSERVED.get(gm, {}))
    for node in gm.graph.nodes:
        ann = A.get_annotation(node)
        kind = op_kind(node)
        if ann is None or kind not in ("linear", "conv2d"):
            continue
        spec, w = ann.input_specs.get(1), node.args[1]
        if not isinstance(spec, (QuantSpec, NF4Spec)) or not isinstance(w, fx.Node) or w.op != "get_attr":
            continue
        if len(w.users) != 1:
            continue  # a shared (tied) weight: rounding it for one user would change the others
        conv = _geometry(node, get_attr_value(gm, w)) if kind == "conv2d" else None
        act = node.args[0]
        while act.op == "call_module" and act.target in observers:  # the float value the observer watches
            act = act.args[0]
        layers.append(Layer(node.name, act.name, w.name, spec, conv))
    return layers


def _ancestors(node: fx.Node) -> set[str]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.name not in seen:
            seen.add(n.name)
            stack.extend(n.all_input_nodes)
    return seen


def rounds(gm: fx.GraphModule, layers: list[Layer]) -> list[list[Layer]]:
    """Consecutive layers grouped so that no layer of a round depends on another of the same round."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out: list[list[Layer]] = []
    for layer in layers:
        anc = _ancestors(nodes[layer.act])
        if out and not any(r.name in anc for r in out[-1]):
            out[-1].append(layer)
        else:
            out.append([layer])
    return out


class _Stop(Exception):
    pass


class _Tap(nn.Module):
    """One point of the graph a calibration round watches; the last tap of a round stops the forward. With a
    ``hessian`` it accumulates the Hessian of the value flowing through it and, with ``key``, streams the float
    model's value at the same point beside it (``state["ref"][key]``); without one it is that float model's tap,
    run first on the same sample, and leaves its value there for ``key``."""

    def __init__(self, state: dict, key=None, hessian: FoldedHessian | None = None):
        super().__init__()
        self.hessian, self.state, self.key = hessian, state, key

    def forward(self, x):
        if self.hessian is None:
            self.state["ref"][self.key] = x.detach()
        else:
            ref = None if self.key is None else self.state["ref"].pop(self.key)
            self.hessian.add(x, self.state["sample"], ref=ref)
        self.state["fired"] += 1
        if self.state["fired"] == self.state["total"]:
            raise _Stop
        return x


def _set_attr(mod: nn.Module, target: str, value: torch.Tensor) -> None:
    owner_name, _, attr = target.rpartition(".")
    owner = mod.get_submodule(owner_name) if owner_name else mod
    old = getattr(owner, attr, None)
    if isinstance(old, nn.Parameter):  # the user's requires_grad kept: a saved program states it
        setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point()))
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


class GPTQRounding:
    """Apply GPTQ to every annotated linear / conv2d weight of a prepared graph.

    ``samples``: a re-iterable of ``(args, kwargs)`` calibration inputs."""

    def __init__(self, config: GPTQConfig = GPTQConfig()):
        self.config = config

    def __call__(self, gm: fx.GraphModule, samples) -> dict:
        runner = _runner(gm)
        stats = meta.WEIGHT_ROUNDING.setdefault(gm, {})
        nodes = {n.name: n for n in gm.graph.nodes}
        for group in rounds(gm, weighted_layers(gm)):
            hessians = self._collect(runner, group, samples)
            for layer in group:
                w_node = nodes[layer.weight]
                w = get_attr_value(gm, w_node).detach().float()
                q, params, stats[layer.name] = gptq_or_rtn(w, hessians[layer.tap_key], layer.spec, self.config)
                if params is not None and breaks_pair_bound(q, params, layer.spec):
                    stats[layer.name] = {**stats[layer.name], "algorithm": "rtn", "reason": "kept round-to-nearest: "
                                         "GPTQ put two same-sign codes past the int16 pair bound"}
                    params = None
                if params is None:  # round-to-nearest generalizes better here: convert rounds the float weight
                    continue
                for mod in (gm, runner):
                    _set_attr(mod, w_node.target, q.to(w.dtype))
                meta.WEIGHT_QPARAMS.set(w_node, params)
        return stats

    def _collect(self, runner: fx.GraphModule, group: list[Layer], samples, reference: fx.GraphModule | None = None
                 ) -> dict:
        """The round's Hessians. ``reference``: a runner holding the float weights; each sample runs through it
        first, and the Hessians stream its layer inputs beside the rounded graph's (:class:`Hessian` ``ref``)."""
        hessians, state = {}, {"fired": 0, "total": 0, "sample": 0, "ref": {}}
        keys, weights = [], {n.name: n for n in runner.graph.nodes if n.op == "get_attr"}
        for layer in group:
            if layer.tap_key in hessians:
                continue
            w = get_attr_value(runner, weights[layer.weight])
            k = w[0].numel() if layer.conv else w.shape[1]
            hessians[layer.tap_key] = FoldedHessian(k, layer.conv.groups if layer.conv else 1, layer.conv)
            keys.append((layer.tap_key, layer.act))
        state["total"] = len(keys)
        placed = [(runner, [_Tap(state, key if reference is not None else None, hessians[key]) for key, _ in keys])]
        if reference is not None:
            placed.insert(0, (reference, [_Tap(state, key) for key, _ in keys]))
        inserted = []
        for mod, taps in placed:
            by_name = {n.name: n for n in mod.graph.nodes}
            for i, (tap, (_, act)) in enumerate(zip(taps, keys)):
                name = f"_gptq_tap_{i}"
                mod.add_submodule(name, tap)
                with mod.graph.inserting_after(by_name[act]):
                    inserted.append((mod, mod.graph.call_module(name, (by_name[act],))))
            mod.recompile()
        try:
            with torch.no_grad():
                for i, (args, kwargs) in enumerate(samples):
                    state["sample"] = i
                    for mod, _ in placed:
                        state["fired"] = 0
                        try:
                            mod(*args, **kwargs)
                        except _Stop:
                            pass
        finally:
            state["ref"].clear()
            for mod, node in inserted:
                mod.graph.erase_node(node)
                mod.delete_submodule(node.target)
            for mod, _ in placed:
                mod.recompile()
        return hessians
