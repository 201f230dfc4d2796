"""Drift: how often production inputs push a quantized tensor outside its calibrated range.

    mon = art.monitor()          # a callable that runs the artifact and counts clipping
    for x in production: y = mon(x)
    print(art.drift_report())    # per quantized tensor: clipped share, batches that clipped, how far out

Counting runs the reference graph beside the artifact (the lowered runtime hides its intermediate
values); ``every=N`` observes one batch in N to bound the cost."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import fx

from .ir import module_path, record_values

qd = torch.ops.quantized_decomposed
FLAG_SHARE = 1e-3  # a tensor is flagged when more than 0.1 % of its elements fall outside the range...
FLAG_EXCURSION = 1.25  # ...or one value lies 25 % beyond the range's end


@dataclass(frozen=True)
class QuantPoint:
    """A quantized activation of the reference graph: the float value and its calibrated range."""
    quantize: str  # the quantize node
    value: str     # the float node it quantizes
    module: str
    lo: float
    hi: float
    step: float


def quant_points(reference: fx.GraphModule) -> list[QuantPoint]:
    points = []
    for n in reference.graph.nodes:
        if n.target != qd.quantize_per_tensor.default or not isinstance(n.args[0], fx.Node):
            continue
        scale, zp, qmin, qmax = (n.args[1], n.args[2], n.args[3], n.args[4])
        if not all(isinstance(v, (int, float)) for v in (scale, zp, qmin, qmax)):
            continue  # a run-time (dynamic) quantize: no calibrated range
        src = n.args[0]
        if _requantized_view(src):
            continue  # a view / transpose of a value already counted, with the same range: nothing new
        if src.op == "placeholder" or src.op == "call_function":
            points.append(QuantPoint(n.name, src.name, module_path(src) or src.name,
                                     (qmin - zp) * scale, (qmax - zp) * scale, float(scale)))
    return points


_SHAPE_OPS = {"view", "reshape", "transpose", "permute", "flatten", "unsqueeze", "squeeze", "contiguous", "clone",
              "expand", "_unsafe_view", "t", "slice", "select"}


def _requantized_view(src) -> bool:
    name = getattr(src.target, "__name__", "").split(".")[0] if src.op == "call_function" else ""
    inp = src.args[0] if src.args else None
    return name in _SHAPE_OPS and isinstance(inp, fx.Node) and inp.target in (
        qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor)


def flat_inputs(args, kwargs) -> list:
    return torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs or {})))[0]


def record_points(reference: fx.GraphModule, points: list[QuantPoint], args, kwargs) -> dict:
    """{value name: float tensor} of the quantized values on one batch."""
    return record_values(reference, flat_inputs(args, kwargs), {p.value for p in points})


def clip_stats(x: torch.Tensor, p: QuantPoint) -> dict:
    """Elements below / above the range (beyond half a step, i.e. clamped by the quantizer) and how far
    out the extreme value lies, as a multiple of the range's end."""
    x = x.detach().float()
    low, high = x < p.lo - p.step / 2, x > p.hi + p.step / 2
    clipped = int(low.sum() + high.sum())
    exc = 1.0
    if p.hi > 0:
        exc = max(exc, x.max().item() / p.hi)
    if p.lo < 0:
        exc = max(exc, x.min().item() / p.lo)
    return {"clipped": clipped, "elements": x.numel(), "excursion": exc}


@dataclass
class TensorDrift:
    tensor: str
    module: str
    lo: float
    hi: float
    batches: int = 0
    elements: int = 0
    clipped: int = 0
    batches_clipped: int = 0
    max_excursion: float = 1.0

    @property
    def clipped_share(self) -> float:
        return self.clipped / self.elements if self.elements else 0.0

    @property
    def flagged(self) -> bool:
        return self.clipped_share > FLAG_SHARE or self.max_excursion > FLAG_EXCURSION

    def add(self, st: dict) -> None:
        self.batches += 1
        self.elements += st["elements"]
        self.clipped += st["clipped"]
        self.batches_clipped += st["clipped"] > 0
        self.max_excursion = max(self.max_excursion, st["excursion"])

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "module": self.module, "range": [self.lo, self.hi], "batches": self.batches,
                "clipped_share": self.clipped_share, "batches_clipped": self.batches_clipped,
                "max_excursion": round(self.max_excursion, 4), "flagged": self.flagged}


@dataclass
class DriftReport:
    tensors: list = field(default_factory=list)  # TensorDrift, most clipped first
    batches: int = 0

    @property
    def flagged(self) -> list:
        return [t for t in self.tensors if t.flagged]

    def to_dict(self) -> dict:
        return {"batches": self.batches, "flagged": [t.tensor for t in self.flagged],
                "tensors": [t.to_dict() for t in self.tensors]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        from .textfmt import table
        head = (f"drift report — {self.batches} batch(es) observed; {len(self.flagged)} of {len(self.tensors)} "
                f"quantized tensors outside their calibrated range"
                + (" — recalibrate on recent data" if self.flagged else ""))
        rows = [[t.tensor, t.module, f"[{t.lo:.4g}, {t.hi:.4g}]", f"{t.clipped_share:.4%}",
                 f"{t.batches_clipped}/{t.batches}", f"{t.max_excursion:.2f}x", "FLAG" if t.flagged else ""]
                for t in self.tensors]
        return head + "\n" + table(["tensor", "module", "calibrated range", "clipped", "batches", "max excursion",
                                    ""], rows)

    __repr__ = __str__


class DriftMonitor:
    """Wraps an artifact: ``mon(*inputs)`` returns the artifact's output and counts clipping."""

    def __init__(self, artifact, every: int = 1):
        self.artifact, self.every, self._calls = artifact, max(1, int(every)), 0
        self.points = quant_points(artifact.reference)
        self.stats = {p.value: TensorDrift(p.value, p.module, p.lo, p.hi) for p in self.points}
        self.batches = 0

    def __call__(self, *args, **kwargs):
        out = self.artifact(*args, **kwargs)
        if self._calls % self.every == 0:
            self.observe(*args, **kwargs)
        self._calls += 1
        return out

    def observe(self, *args, **kwargs) -> None:
        """Count clipping on one batch without running the artifact."""
        values = record_points(self.artifact.reference, self.points, args, kwargs)
        for p in self.points:
            v = values.get(p.value)
            if isinstance(v, torch.Tensor):
                self.stats[p.value].add(clip_stats(v, p))
        self.batches += 1

    def reset(self) -> None:
        self.__init__(self.artifact, self.every)

    def report(self) -> DriftReport:
        rows = sorted(self.stats.values(), key=lambda t: (-t.flagged, -t.clipped_share, -t.max_excursion))
        return DriftReport(rows, self.batches)
