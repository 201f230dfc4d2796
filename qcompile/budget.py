"""Accuracy budget: give layers back higher precision until a task metric holds.

``compile(model, x, backend, calibration=cal, accuracy=AccuracyBudget(metric=fn, data=val, max_drop=0.01))``

1. The float model's metric and the plain quantized artifact's metric; done if the drop is within budget.
2. Cheap proxy ranking (no recompiling): on a few validation samples, the reference graph is run once
   per quantized module with that module's quantize/dequantize pairs bypassed; the output SQNR gained
   says how much harm that module's quantization does.
   The bypass covers what moving a module to float removes: the rounding of its weights, of its output
   activations, and of its input where no other int8 module rounds it (the model input, for a stem).
3. The most harmful modules are moved back one step at a time -- 8-bit weights where they were below 8
   bits, float where they were int8 (``exclude=``) -- recompiling and re-measuring the metric after each,
   until the budget holds, the candidates run out, or ``time_limit_s`` passes (then the first artifact
   that reached the highest metric is the answer).
4. Every move of the answer is then undone in turn and stays undone if the metric still meets the budget
   (or, unmet, the best metric) without it: moves that did not matter cost speed for nothing.

Every step (what moved, metric, latency, size) is written to ``state_path`` (JSON) as it completes; a
search started again with the same arguments and ``state_path`` replays the finished steps without
recompiling them and returns the same answer.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .errors import ConfigError

qd = torch.ops.quantized_decomposed


@dataclass
class AccuracyBudget:
    """metric(fn) -> float, higher is better (``fn`` is the float model or an artifact); None: top-1
    agreement with the float model on ``data`` (classifiers). max_drop: allowed metric drop from float."""

    metric: Callable | None = None
    data: Sequence = ()
    max_drop: float = 0.01
    time_limit_s: float | None = None
    state_path: str | None = None
    max_steps: int = 30
    proxy_samples: int = 4
    progress: bool | None = None


def agreement_metric(model, data) -> Callable:
    """Top-1 agreement of ``fn`` with ``model`` on ``data`` (float outputs computed once)."""
    with torch.no_grad():
        ref = [model(x).argmax(-1) for x in data]

    def metric(fn) -> float:
        with torch.no_grad():
            hits = [(fn(x).argmax(-1) == r).float() for x, r in zip(data, ref)]
        return float(torch.cat([h.flatten() for h in hits]).mean())
    return metric


def _size(art) -> int:
    """Bytes of the stored tensors of the lowered model (report.storage), 0 when the backend does not say."""
    return int(sum(int(r.get("bytes", 0) or 0) for r in getattr(art.report, "storage", []) or []))


def _latency_ms(fn, x, repeats: int = 5) -> float:
    times = []
    with torch.no_grad():
        fn(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def module_harm(art, samples, float_outputs, float_weights: dict | None = None) -> list[tuple[str, float]]:
    """``[(module path, output SQNR gained (dB) when it runs in float)]``, most harmful first.

    Running a module in float removes three errors, and the proxy bypasses all three on a copy of the
    reference graph: the rounding of its input activations (the edge into its conv / linear only, other
    consumers of the same value keep theirs), of its weights (``float_weights``: {conv / linear node name:
    the float weight convert quantized}), and of its output activations. Without the first two a layer
    whose own weights or 8-bit input are the problem -- an image model's stem, which reads the quantized
    picture -- would never rank."""
    from .ir import module_path
    ref = art.reference
    by_module: dict[str, dict] = {}

    def entry(path):
        return by_module.setdefault(path, {"outputs": set(), "inputs": set()})
    gemms = []
    for n in ref.graph.nodes:
        if n.target == qd.quantize_per_tensor.default and isinstance(n.args[0], torch.fx.Node):
            path = module_path(_producer(n.args[0]))
            if path:
                entry(path)["outputs"].add(n.name)
        elif n.op == "call_function" and _gemm_input_quantize(n) is not None and module_path(n):
            gemms.append(n)
    owned = set().union(*(p["outputs"] for p in by_module.values())) if by_module else set()
    for n in gemms:  # its weights always; its input's rounding only where no other module owns it (a module
        # moved to float does not stop its int8 producer from rounding its output: the model input does)
        e = entry(module_path(n))
        e["inputs"].add(n.name)
        if _gemm_input_quantize(n).name not in owned:
            e.setdefault("own_input", set()).add(n.name)

    base = _output_sqnr(ref, samples, float_outputs)
    out = []
    for path, parts in by_module.items():
        gm = _bypassed(ref, parts["outputs"], parts["inputs"], float_weights or {}, parts.get("own_input", set()))
        out.append((path, round(_output_sqnr(gm, samples, float_outputs) - base, 4)))
    return sorted(out, key=lambda kv: -kv[1])


def _gemm_input_quantize(node):
    """The quantize node whose dequantized value is ``node``'s input 0, when ``node`` is a conv / linear."""
    from .passes.pattern import op_kind
    if op_kind(node) not in ("conv2d", "conv1d", "linear") or not node.args:
        return None
    dq = node.args[0]
    if not (isinstance(dq, torch.fx.Node) and dq.target == qd.dequantize_per_tensor.default
            and isinstance(dq.args[0], torch.fx.Node) and dq.args[0].target == qd.quantize_per_tensor.default):
        return None
    return dq.args[0]


def _producer(node):
    """The conv / linear whose output ``node`` is (through activations, pads and dequantize nodes)."""
    from .passes.pattern import op_kind
    seen = 0
    while op_kind(node) not in ("conv2d", "linear", "matmul", "bmm", "embedding") and seen < 8:
        args = [a for a in node.args if isinstance(a, torch.fx.Node)] if node.op == "call_function" else []
        if len(args) != 1:
            break
        node, seen = args[0], seen + 1
    return node


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _bypassed(ref, qnames: set, gemms: set = frozenset(), float_weights: dict | None = None,
              unrounded_inputs: set = frozenset()):
    """A copy of the reference graph where the named quantize nodes' dequantize users read the float value,
    the conv / linear nodes named in ``gemms`` read their float weights (where ``float_weights`` has them)
    and those in ``unrounded_inputs`` their input 0 unrounded."""
    import copy

    from .ir import add_constant
    gm = copy.deepcopy(ref)
    for n in list(gm.graph.nodes):
        if n.name in qnames:
            for dq in list(n.users):
                dq.replace_all_uses_with(n.args[0])
        if n.name in unrounded_inputs:
            q = _gemm_input_quantize(n)
            if q is not None:
                n.update_arg(0, q.args[0])
        if n.name in gemms:
            w = (float_weights or {}).get(n.name)
            if w is not None and len(n.args) > 1 and _weight_shape(gm, n.args[1]) == tuple(w.shape):
                n.update_arg(1, add_constant(gm, f"{n.name}_float_weight", w, n))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _weight_shape(gm, node) -> tuple | None:
    """Shape of the weight a dequantize node of the reference graph produces (its integer constant's)."""
    from .ir import get_attr_value
    src = node.args[0] if isinstance(node, torch.fx.Node) and node.args else None
    if isinstance(src, torch.fx.Node) and src.op == "get_attr":
        return tuple(get_attr_value(gm, src).shape)
    return None


# -- the search -------------------------------------------------------------------------------------
def _output_sqnr(fn, samples, float_outputs) -> float:
    """Mean output SQNR (dB) against float on ``samples`` (each step records it beside the metric)."""
    from .qparams import sqnr
    with torch.no_grad():
        return float(sum(sqnr(_first(f), _first(fn(x))) for x, f in zip(samples, float_outputs)) / len(samples))


def _load_state(path: str | None, key: dict) -> dict:
    if path and os.path.exists(path):
        with open(path) as f:
            state = json.load(f)  # plain JSON: nothing is executed
        if state.get("key") == key:
            return state
    return {"key": key, "steps": []}


def _save_state(path: str | None, state: dict) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, path)  # an interruption never leaves a half-written state


def _overrides(moved: list[list], weight_bits: int | None, options: dict) -> dict:
    """compile() options for the modules moved so far: ``[path, "int8" | "float"]`` entries."""
    from .config import ModuleConfig
    from .specs import WeightSpec
    opts = dict(options)
    floats = [p for p, to in moved if to == "float"]
    int8 = {p: ModuleConfig(weights=WeightSpec(bits=8)) for p, to in moved if to == "int8" and p not in floats}
    if floats:
        opts["exclude"] = tuple(opts.get("exclude") or ()) + tuple(floats)
    if int8:
        from .config import QConfig
        base = opts.pop("config", None) or QConfig(weights=opts.pop("weights", None), activations=opts.pop("activations", None))
        opts["config"] = QConfig(base.weights, base.activations, dict(base.module_types),
                                 {**base.module_names, **int8}, tuple(base.exclude), base.quantize_outputs)
    return opts


def search(model, example_inputs, backend, calibration, budget: AccuracyBudget, **options):
    """The fastest-to-find artifact meeting ``budget`` (see the module docstring); ``art.report.budget``
    holds the steps: what moved, metric, latency (ms, one example input), size (bytes), int8 share of MACs."""
    from tqdm.auto import tqdm

    from . import pipeline
    if not budget.data:
        raise ConfigError("AccuracyBudget needs data=<validation samples> (inputs the metric runs on)")
    metric = budget.metric or agreement_metric(model, budget.data)
    weights = options.get("weights")
    bits = getattr(weights, "bits", None) if weights is not None else None
    key = {"backend": str(backend), "max_drop": budget.max_drop, "options": repr(sorted(options.items())),
           "n_data": len(budget.data)}
    state = _load_state(budget.state_path, key)
    t0 = time.perf_counter()
    x0 = example_inputs[0] if isinstance(example_inputs, tuple) else example_inputs
    if "float_metric" not in state:
        state["float_metric"] = float(metric(model))
        _save_state(budget.state_path, state)
    target = state["float_metric"] - budget.max_drop

    def build(moved: list, float_weights: dict | None = None):
        opts = pipeline.Options.parse(_overrides(moved, bits, options))
        return pipeline.compile_model(model, example_inputs, backend, opts, calibration, verify=False, progress=False,
                                      float_weights=float_weights)

    samples = list(budget.data)[:budget.proxy_samples]
    with torch.no_grad():
        f_out = [model(x) for x in samples]

    def measure(moved: list) -> dict:
        for rec in state["steps"]:
            if rec["moved"] == moved:
                return rec  # finished before an interruption: replayed, not recompiled
        art = build(moved)
        rec = {"moved": moved, "metric": float(metric(art)), "sqnr_db": _output_sqnr(art, samples, f_out),
               "latency_ms": _latency_ms(art, x0), "size_bytes": _size(art),
               "int8_mac_share": art.report.summary()["int8_mac_share"]}
        state["steps"].append(rec)
        _save_state(budget.state_path, state)
        return rec

    moved: list = []
    rec = measure(moved)
    if rec["metric"] < target and "ranking" not in state:
        weights: dict = {}
        state["ranking"] = module_harm(build(moved, weights), samples, f_out, weights)
        _save_state(budget.state_path, state)
    bar = tqdm(total=budget.max_steps, desc="accuracy budget", disable=budget.progress is False if
               budget.progress is not None else None, leave=False)
    candidates = [p for p, _ in state.get("ranking", [])]
    best = (rec, moved)
    while rec["metric"] < target and candidates and len(moved) < budget.max_steps:
        if budget.time_limit_s is not None and time.perf_counter() - t0 > budget.time_limit_s:
            break
        path = candidates.pop(0)
        to = "int8" if bits is not None and bits < 8 and [path, "int8"] not in moved else "float"
        moved = [m for m in moved if m[0] != path] + [[path, to]]
        if to == "int8":
            candidates.insert(1, path)  # may go to float later
        rec = measure(moved)  # kept even when it does not help alone: a value's rounding goes only when its
        bar.update(1)         # producer and its consumer both move, which no single move shows
        if rec["metric"] > best[0]["metric"]:
            best = (rec, moved)
    bar.close()
    final_rec, final_moved = (rec, moved) if rec["metric"] >= target else best
    goal = min(target, final_rec["metric"])
    for entry in list(final_moved):  # undo every move the goal holds without: no layer float for nothing
        if budget.time_limit_s is not None and time.perf_counter() - t0 > budget.time_limit_s:
            break
        trial = [m for m in final_moved if m != entry]
        trial_rec = measure(trial)
        if trial_rec["metric"] >= goal:
            final_moved, final_rec = trial, trial_rec
    art = build(final_moved)
    base = state["steps"][0]
    art.report.budget = {"float_metric": state["float_metric"], "target": target, "met": final_rec["metric"] >= target,
                         "moved": final_moved, "metric": final_rec["metric"], "steps": state["steps"],
                         "int8_mac_share": final_rec.get("int8_mac_share"),
                         "latency_cost_ms": final_rec["latency_ms"] - base["latency_ms"],
                         "size_cost_bytes": final_rec["size_bytes"] - base["size_bytes"]}
    return art
