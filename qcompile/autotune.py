"""``qcompile.autotune``: the order practitioners follow, measured, and the fastest artifact that meets the budget.

1. float baseline (the metric's reference point and the latency to beat);
2. dynamic int8 (no calibration; where the backend has it for this model);
3. static int8, plain post-training quantization;
4. static int8 with the accuracy algorithms (``algorithm=["recommended", "smoothquant"]``);
5. mixed precision under the budget (:mod:`qcompile.budget`: the most harmful layers back to higher
   precision), only when no earlier step met it;
6. when nothing meets it: the recommendation to train with ``qcompile.prepare_qat``, and the step with
   the best metric is returned.

Every step is recorded -- metric, drop from float, latency (median of interleaved runs on one example),
stored bytes, whether it meets the budget, or why it could not run -- in ``art.report.autotune``;
:func:`format_steps` prints it as a table.
"""
from __future__ import annotations

import time

import torch

from .errors import ConfigError, QCompileError

STATIC_ALGORITHMS = ["recommended", "smoothquant"]


def _latency_ms(fn, args, repeats: int) -> float:
    times = []
    with torch.no_grad():
        fn(*args)
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def _size(art) -> int | None:
    storage = getattr(getattr(art, "report", None), "storage", None) or []
    total = sum(int(r.get("bytes", 0) or 0) for r in storage)
    return total or None


def _float_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _candidates(calibration, options: dict) -> list:
    """(step name, compile keyword arguments) in the practitioners' order (steps 2-4)."""
    return [("dynamic int8", dict(options, mode="dynamic")),
            ("static int8", dict(options, calibration=calibration)),
            ("static int8 + algorithms", dict(options, calibration=calibration, algorithm=STATIC_ALGORITHMS))]


def autotune(model, example_inputs, backend="x86", *, calibration, accuracy, repeats: int = 10, **options):
    """Try the steps above; return the fastest artifact whose metric is within ``accuracy.max_drop`` of
    float (``accuracy``: a :class:`qcompile.AccuracyBudget`). Other options go to every compile."""
    from .api import compile as qcompile_
    from .budget import AccuracyBudget, agreement_metric
    if not isinstance(accuracy, AccuracyBudget) or not accuracy.data:
        raise ConfigError("autotune needs accuracy=qcompile.AccuracyBudget(data=<validation samples>, ...)")
    if calibration is None:
        raise ConfigError("autotune needs calibration=<iterable of samples> for its static steps")
    calibration = list(calibration)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    metric = accuracy.metric or agreement_metric(model, accuracy.data)
    float_metric = float(metric(model))
    target = float_metric - accuracy.max_drop
    steps = [{"step": "float", "metric": float_metric, "drop": 0.0, "latency_ms": _latency_ms(model, args, repeats),
              "bytes": _float_bytes(model), "meets": True, "note": "baseline"}]
    arts = {}
    for name, kw in _candidates(calibration, options):
        steps.append(_try(name, lambda kw=kw: qcompile_(model, example_inputs, backend, verify=False, progress=False,
                                                          **kw), metric, float_metric, target, args, repeats, arts))
    if not any(s["meets"] for s in steps[1:]):
        budget_kw = dict(options, calibration=calibration, algorithm=STATIC_ALGORITHMS, accuracy=accuracy)
        steps.append(_try("mixed precision under the budget", lambda: qcompile_(
            model, example_inputs, backend, verify=False, progress=False, **budget_kw), metric, float_metric, target,
            args, repeats, arts))
    return _choose(steps, arts, target, float_metric)


def _try(name, build, metric, float_metric, target, args, repeats, arts) -> dict:
    try:
        art = build()
    except QCompileError as e:
        return {"step": name, "metric": None, "drop": None, "latency_ms": None, "bytes": None, "meets": False,
                "note": f"could not run: {str(e).splitlines()[0][:160]}"}
    value = float(metric(art))
    arts[name] = art
    return {"step": name, "metric": value, "drop": float_metric - value, "latency_ms": _latency_ms(art, args, repeats),
            "bytes": _size(art), "meets": value >= target, "note": ""}


def _choose(steps, arts, target, float_metric):
    meeting = [s for s in steps[1:] if s["meets"] and s["step"] in arts]
    if meeting:
        chosen = min(meeting, key=lambda s: s["latency_ms"])
        recommendation = None
    else:
        measured = [s for s in steps[1:] if s["step"] in arts]
        if not measured:
            raise QCompileError("autotune: no quantized step could run: " + "; ".join(s["note"] for s in steps[1:]))
        chosen = max(measured, key=lambda s: s["metric"])
        recommendation = ("no post-training step met the budget: train with qcompile.prepare_qat (quantization-aware "
                          f"training); returned the best metric found ({chosen['step']})")
    art = arts[chosen["step"]]
    for s in steps:
        s["chosen"] = s is chosen
    art.report.autotune = {"float_metric": float_metric, "target": target, "chosen": chosen["step"],
                           "recommendation": recommendation, "steps": steps}
    return art


def format_steps(autotune_report: dict) -> str:
    """The steps as a plain-text table (what ``print`` of an autotune result shows)."""
    from .textfmt import table
    rows = [[("* " if s.get("chosen") else "  ") + s["step"],
             "-" if s["metric"] is None else f"{s['metric']:.4f}",
             "-" if s["drop"] is None else f"{s['drop']:+.4f}",
             "-" if s["latency_ms"] is None else f"{s['latency_ms']:.2f}",
             "-" if s["bytes"] is None else f"{s['bytes'] / 2**20:.2f}",
             "yes" if s["meets"] else "no", s["note"]] for s in autotune_report["steps"]]
    text = table(["step", "metric", "drop", "latency ms", "MiB", "meets budget", "note"], rows)
    if autotune_report.get("recommendation"):
        text += "\n" + autotune_report["recommendation"]
    return text
