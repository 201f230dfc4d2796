"""Per-tensor choice of the calibration method by the model-output error it gives on calibration data.

``ActivationSpec(observer="auto")`` (opt-in): every per-tensor activation keeps one histogram, and after
calibration :func:`choose_ranges` reads four ranges off it — min/max, percentile (``ActivationSpec.percentile``),
MSE and entropy (KL) — and picks, per tensor, the one under which the model's outputs are closest to float
(every activation fake-quantized with its current choice, conv / linear weights rounded as convert will round
them):

1. every tensor on MSE (the baseline), then every tensor on each other method: the best of the four
   uniform assignments is the start;
2. one sweep over the tensors, those whose four ranges disagree most first: each other range is tried for
   that tensor alone and kept when it lowers the output error by at least 1 %.

``compile`` judges on the last ``min(4, n // 2)`` samples of a calibration list with the observers calibrated
on the others, then calibrates on those too (judged on the samples a range was fitted to, the choice favoured
clipping that cost accuracy on held-out data: measured). The error of a method for one tensor is not its own
MSE (which the MSE range minimises by construction): a clipped tail and the same squared rounding noise do
different harm once they pass through the layers after it.

Why it is not the default (docs/accuracy.md has the tables): no single method wins on held-out data — on the
conformance models (x86, 8 held-out inputs) min/max beat MSE by up to 1.2 dB on 13 of 27 and lost up to
1.4 dB on the others — and the choice made on a few calibration samples did not predict held-out accuracy
reliably: MiniLM-L6 with real sentences, min cosine on x86 0.9830 (MSE) -> 0.990, on ONNX 0.9825 -> 0.9836;
EfficientNet-Lite2 x86 15.22 -> 15.10 dB; the conformance suite (4 calibration samples) 0.25 dB lower on
average.

Cost: ``2 + 3 + k`` forward passes over at most ``max_samples`` samples; the sweep's ``k`` is bounded by
``max_evaluations`` and by the observed activation volume (``max_elements`` elements fake-quantized in all,
so a large model gets fewer sweep steps — a count, not a clock, so the choice is the same on every
machine). Tensors the sweep did not reach keep the uniform choice. The report
(``report.algorithms["range_choice"]``) lists how many tensors took each method, the output SQNR on the
judged samples before and after, the evaluations spent, and every tensor with outlier channels (abs-max
> 8x the median channel's): which channels, and how many of them MSE and the chosen range clip.
"""
from __future__ import annotations

import math
import time

import torch
from torch import fx

from qcompile.observers import RANGE_METHODS, HistogramObserver, Observer

from .bias_correction import quantized_layers, rounded_weight

HOLD_BACK = True
MIN_GAIN = 0.01  # a sweep step is kept when it lowers the calibration output error by >= 1 %
MAX_SAMPLES = 4
MAX_EVALUATIONS = 64
MAX_ELEMENTS = 2e9  # fake-quantized activation elements over the whole search (deterministic cost bound)


def auto_observers(gm: fx.GraphModule) -> list[tuple[str, HistogramObserver]]:
    """The calibrated ``observer="auto"`` observers of a prepared graph, in graph order (shared ones once)."""
    seen, out = set(), []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, HistogramObserver) and mod.method == "auto" and mod.num_batches and id(mod) not in seen:
            seen.add(id(mod))
            out.append((node.target, mod))
    return out


def _leaves(out) -> list[torch.Tensor]:
    return [t.detach().float() for t in torch.utils._pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _slot(gm: fx.GraphModule, target: str):
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    table = owner._parameters if name in owner._parameters else owner._buffers if name in owner._buffers else None
    return owner, name, table


class _Replay:
    """Run the prepared graph with every observer replaying (no statistics, no health hooks): pass-through
    for the float reference, fake-quantized with an assignment otherwise. With an assignment, every conv /
    linear weight convert quantizes is swapped for the rounded weight convert will produce (the float
    objects are put back on exit; nothing is changed in place)."""

    def __init__(self, gm: fx.GraphModule, samples: list):
        self.gm, self.samples = gm, samples
        self.observers = [m for m in gm.modules() if isinstance(m, Observer)]
        self.rounded = {}
        for layer, _, spec in quantized_layers(gm):
            self.rounded.setdefault(layer.args[1].target, rounded_weight(gm, layer, spec))
        self._weights_rounded = False

    def __enter__(self):
        self._hooks = {id(m): m._forward_hooks.copy() for m in self.observers}
        for m in self.observers:
            m._forward_hooks.clear()
        self._float = {t: self._get(t) for t in self.rounded}
        return self

    def _get(self, target):
        owner, name, table = _slot(self.gm, target)
        return table[name] if table is not None else getattr(owner, name)

    def _set_weights(self, rounded: bool) -> None:
        if rounded == self._weights_rounded:
            return
        for target, value in (self.rounded if rounded else self._float).items():
            owner, name, table = _slot(self.gm, target)
            if table is not None:
                table[name] = value
            else:
                setattr(owner, name, value)
        self._weights_rounded = rounded

    def __exit__(self, *exc):
        self._set_weights(False)
        for m in self.observers:
            m._replay = None
            m._forward_hooks.update(self._hooks[id(m)])
        return False

    def run(self, fixed: dict, choice: dict | None) -> list[list[torch.Tensor]]:
        """``choice``: {observer: QParams}; the other observers use ``fixed``; None: all float."""
        self._set_weights(choice is not None)
        for m in self.observers:
            m._replay = "float" if choice is None else choice.get(m, fixed.get(m, "float"))
        with torch.no_grad():
            return [_leaves(self.gm(*args, **kwargs)) for args, kwargs in self.samples]


def _error(ref: list, out: list) -> float:
    noise = sum(float(((r.double() - o.double()) ** 2).sum()) for rs, os_ in zip(ref, out) for r, o in zip(rs, os_))
    signal = sum(float((r.double() ** 2).sum()) for rs in ref for r in rs)
    return noise / signal if signal > 0 else noise


def _db(err: float) -> float:
    return round(-10 * math.log10(err), 2) if err > 0 else math.inf


def choose_ranges(gm: fx.GraphModule, samples, max_samples: int = MAX_SAMPLES,
                  max_evaluations: int = MAX_EVALUATIONS, max_elements: float = MAX_ELEMENTS) -> dict:
    """Set ``chosen`` on every ``observer="auto"`` observer of the calibrated graph ``gm`` (module doc);
    ``samples``: (args, kwargs) pairs. Returns the report entry."""
    t0 = time.perf_counter()
    observers = auto_observers(gm)
    if not observers:
        return {}
    data = []
    for s in samples:
        data.append(s)
        if len(data) >= max_samples:
            break
    cands = {mod: {method: mod.qparams_for(method) for method in RANGE_METHODS} for _, mod in observers}
    fixed = {m: m.calculate_qparams() for m in gm.modules() if isinstance(m, Observer) and m.num_batches
             and m not in cands and m.spec.granularity == "per_tensor"}
    per_eval = max(1, sum(mod.elements for _, mod in observers) * len(data))
    budget = max(4, min(max_evaluations, int(max_elements // per_eval)))
    evaluations = 0
    with _Replay(gm, data) as replay:
        ref = replay.run(fixed, None)

        def error(assign: dict) -> float:
            nonlocal evaluations
            evaluations += 1
            return _error(ref, replay.run(fixed, {m: cands[m][meth] for m, meth in assign.items()}))

        assign = {m: RANGE_METHODS[0] for m in cands}
        base = best = error(assign)
        uniform = {RANGE_METHODS[0]: base}
        for method in RANGE_METHODS[1:]:
            trial = {m: method for m in cands}
            uniform[method] = e = error(trial)
            if e < best:
                assign, best = trial, e
        start = min(uniform, key=uniform.get)

        def key(qp):
            return float(qp.scale), int(qp.zero_point)

        def spread(m):
            scales = [float(q.scale) for q in cands[m].values()]
            return max(scales) / max(min(scales), 1e-30)
        order = sorted((m for m in cands if len({key(q) for q in cands[m].values()}) > 1), key=spread, reverse=True)
        swept = 0
        for m in order:
            if evaluations >= budget:
                break
            swept += 1
            tried = {key(cands[m][assign[m]])}
            for method in cands[m]:
                if key(cands[m][method]) in tried or evaluations >= budget:
                    continue
                tried.add(key(cands[m][method]))
                e = error({**assign, m: method})
                if e < best * (1 - MIN_GAIN):
                    assign, best = {**assign, m: method}, e
    for m, method in assign.items():
        m.chosen = method
    counts = {meth: sum(1 for v in assign.values() if v == meth) for meth in RANGE_METHODS}
    outliers = []
    for name, mod in observers:
        chans = mod.outlier_channels()
        if chans:
            outliers.append({"tensor": mod.name, "channels": chans[:10], "n_outlier_channels": len(chans),
                             "chosen": assign[mod], "clipped_by_mse": len(mod.clipped_channels(chans, "mse")),
                             "clipped_by_chosen": len(mod.clipped_channels(chans, assign[mod]))})
    return {"outlier_channels": outliers[:20],"tensors": len(assign), "methods": {k: v for k, v in counts.items() if v},
            "uniform_start": start, "calibration_sqnr_db": {"mse": _db(base), "chosen": _db(best)},
            "uniform_sqnr_db": {k: _db(v) for k, v in uniform.items()},
            "swept": f"{swept} of {len(order)} tensors", "evaluations": evaluations, "samples": len(data),
            "seconds": round(time.perf_counter() - t0, 2)}
