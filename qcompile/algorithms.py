"""Accuracy-recovery algorithms run on the prepared graph before calibration (``compile(algorithm=...)``).

``algorithm`` is ``None`` (the defaults, :func:`default_set`: bias correction in static mode, plus greedy
learned rounding for <= 4-bit weights; nothing in the other modes), one name, a config object, or a list
of them. ``"rtn"`` (or ``[]``) turns every default off: plain round-to-nearest PTQ. ``"recommended"``
expands to the defaults plus cross-layer equalization (:func:`defaults`) and can be combined with other
names. Equalization is not a default: with per-channel weights it measured worse on both real models
(EfficientNet-Lite2 14.8 -> 13.6 dB, the d=384 encoder's min cosine 0.999962 -> 0.999960), while bias
correction helped both (84.7 -> 87.8 % top-1 agreement; 0.999962 -> 0.999972).

=================  ==========================================================  =====================
name               what                                                        pass
=================  ==========================================================  =====================
"exact_input"      an image input's 8-bit pixel lattice quantized exactly      passes/input_lattice.py
"smoothquant"      SmoothQuant: LayerNorm -> linear outliers into the weights  passes/smoothquant.py
"equalize"         cross-layer equalization + high-bias absorption            passes/equalize.py
"gptq"             GPTQ weight rounding (kept per layer only where it wins)    passes/weight_only.py
"adaround"         learned rounding (AdaRound), layer-wise reconstruction     passes/adaround.py
"greedy_rounding"  steepest-descent flips on AdaRound's objective (cheap)     passes/adaround.py
"bias_correction"  empirical bias correction of the weights' rounding shift    passes/bias_correction.py
"rtn"              round-to-nearest (nothing to run; spelled for clarity)      --
=================  ==========================================================  =====================

They run in the order of this table whatever order they are given in. The report's
``algorithms`` entry says what each did. "exact_input" is applied by ``compile`` on the captured graph
(it needs the calibration inputs before capture); ``prepare`` / ``calibrate`` cannot apply it.
"""
from __future__ import annotations

import time

from . import meta
from .errors import ConfigError

ORDER = ("exact_input", "smoothquant", "equalize", "gptq", "adaround", "greedy_rounding", "bias_correction", "rtn")
ROUNDINGS = ("gptq", "adaround", "greedy_rounding")
RECOMMENDED = "recommended"
DATA_FREE = ("rtn",)
REPORT_KEY = meta.ALGORITHMS.name  # the key's string, for older callers


def _config_name(a) -> str | None:
    from .gptq import GPTQConfig
    if isinstance(a, GPTQConfig):
        return "gptq"
    try:
        from .passes.adaround import AdaRoundConfig, GreedyRoundingConfig
        if isinstance(a, AdaRoundConfig):
            return "adaround"
        if isinstance(a, GreedyRoundingConfig):
            return "greedy_rounding"
    except ImportError:  # pragma: no cover
        pass
    return a if isinstance(a, str) and (a in ORDER or a == RECOMMENDED) else None


def normalize(algorithm) -> dict | None:
    """``{name: config or None}`` in run order, or None for "use the defaults"; ConfigError if unknown."""
    if algorithm is None:
        return None
    items = list(algorithm) if isinstance(algorithm, (list, tuple)) else [algorithm]
    out = {}
    for a in items:
        name = _config_name(a)
        if name is None:
            raise ConfigError(f"algorithm must be one of {ORDER}, a qcompile.gptq.GPTQConfig, a "
                              f"qcompile.passes.adaround.AdaRoundConfig / GreedyRoundingConfig, or a list of them; "
                              f"got {a!r}")
        out[name] = None if isinstance(a, str) else a
    if sum(r in out for r in ROUNDINGS) > 1:
        raise ConfigError(f"algorithm: choose one weight rounding of {ROUNDINGS}, not several")
    return {k: out[k] for k in (RECOMMENDED,) + ORDER if k in out}


def resolve(algorithm, mode: str, weight_bits: int | None) -> dict:
    """The algorithms to run, in order: ``"recommended"`` expanded for the mode and weight width."""
    if algorithm is None:
        return default_set(mode, weight_bits)
    chosen = normalize(algorithm) or {}
    if RECOMMENDED in chosen:
        named = [r for r in ROUNDINGS if r in chosen]
        base = defaults(mode, weight_bits)
        if named:  # an explicit rounding replaces the recommended one
            base = {k: v for k, v in base.items() if k not in ROUNDINGS}
        chosen = {**base, **{k: v for k, v in chosen.items() if k != RECOMMENDED}}
    return {k: chosen[k] for k in ORDER if k in chosen}


def default_set(mode: str, weight_bits: int | None) -> dict:
    """What ``algorithm=None`` runs in static mode: bias correction (one pass over the calibration data; it
    helped on every real model measured), plus learned rounding for <= 4-bit weights: greedy rounding (steepest
    descent on AdaRound's objective), which beat AdaRound's Adam on EfficientNet-Lite2 w4a8 (69.4 % top-1
    agreement, 9.1 dB against 62.2 %, 7.0 dB; AdaRound at 1500 iterations: 62.2 %, 6.7 dB), matched it on MiniLM
    w4a8 (min / mean cosine 0.931 / 0.964 against 0.934 / 0.954) and lost to it on a digits MobileNet V2
    (agreement 77.1 against 80.0 %, test accuracy 56.9 against 56.0 %), for a quarter to a fifth of the
    compile time (26 s against 132 s on MiniLM, 59 against 209 s on EfficientNet-Lite2). Exact 8-bit
    inputs are a default (since 2026-12-07; they apply only where every calibration input lies on an 8-bit
    pixel lattice, as an image pipeline's uint8 pixels do, and need the calibration data at compile, so not in
    ``prepare``): with the default rounding, EfficientNet-Lite2 on 8-bit-pixel crops went from 90.8 % / 19.5 dB
    to 94.9 % / 23.3 dB (x86), and on five conformance conv nets fed 8-bit photo crops (x86 and ONNX) the ten
    rows moved -1.0 to +1.2 dB, +0.06 dB on average (docs/accuracy.md). Alone, before greedy rounding was a
    default, they had measured -1.6 dB on a ConvNeXt (the stem's weights times the step round differently).
    Greedy rounding is the default at 8 bits too, on the first 8 calibration samples and at most 64 flips per
    weight row (``GREEDY_8BIT``; ResNet-18 at 224 px: 5 -> 38 s of compile time): on the
    conformance suite (4 calibration samples, pooled held-out SQNR) it raised 25 of the 27 static x86 rows
    (ViT +3.0, BEiT +3.2, Whisper +6.0 dB; ConvNeXt and MobileNetV1 -0.1) and took the rows at or above the peer
    tools from 99 to 108 of 114, though it lowered some conv nets on ONNX (MobileNetV2 -0.5, EfficientNet -1.6
    dB: docs/conformance.md). On EfficientNet-Lite2 (real weights, 32 crops) it took the logit
    SQNR from 15.2 to 16.7 dB at the same top-1 agreement, for 12 -> 24 s of compile time (docs/accuracy.md).
    It needs two calibration samples (one per cross-validation fold); with one it is skipped and the report says
    so. Nothing in dynamic / weight-only mode."""
    if mode != "static":
        return {}
    from .passes.adaround import GREEDY_8BIT
    chosen = {"exact_input": None, "bias_correction": None}
    chosen["greedy_rounding"] = None if weight_bits is not None and weight_bits <= 4 else GREEDY_8BIT
    return {k: chosen[k] for k in ORDER if k in chosen}


def defaults(mode: str, weight_bits: int | None) -> dict:
    """What ``algorithm="recommended"`` runs: the defaults plus cross-layer equalization (static mode only)."""
    chosen = default_set(mode, weight_bits)
    if mode == "static":
        chosen["equalize"] = None
    return {k: chosen[k] for k in ORDER if k in chosen}


MIN_SAMPLES_ROUNDING = 2  # the default greedy rounding's minimum: one sample per cross-validation fold
MIN_SAMPLES_BIAS_CORRECTION = 6  # the default's minimum: measured harmful on 4, helpful on 7 and 8 (below)


def too_few_for_default(algorithm, chosen: dict, calibration) -> dict:
    """``{"bias_correction": {"skipped": why}}`` when the *default* bias correction would run on fewer than
    MIN_SAMPLES_BIAS_CORRECTION calibration samples, else {}. On the conformance suite's 4 samples it won 7
    more static rows against the peers but took MobileViT from 19.6 to 14.3 dB (4 samples' means disagreed
    with the held-out image's); on 7 (ResNet-18, bench_x86) and 8 (the d=384 encoder) it gained 5.5 dB and
    1e-5 of cosine. Asked for by name, it always runs."""
    n = len(calibration) if algorithm is None and hasattr(calibration, "__len__") else None
    if n is None:
        return {}
    out = {}
    if "bias_correction" in chosen and n < MIN_SAMPLES_BIAS_CORRECTION:
        out["bias_correction"] = {"skipped": f"{n} calibration samples; the default bias correction needs at least "
                                             f"{MIN_SAMPLES_BIAS_CORRECTION} (its per-channel means are noise on "
                                             f"fewer): give more samples, or algorithm='bias_correction' to force it"}
    if "greedy_rounding" in chosen and n < MIN_SAMPLES_ROUNDING:
        out["greedy_rounding"] = {"skipped": f"{n} calibration sample; the default greedy rounding needs at least "
                                             f"{MIN_SAMPLES_ROUNDING} (it keeps a layer's rounding only where it wins "
                                             f"on samples it was not fitted on): give more samples, or "
                                             f"algorithm='greedy_rounding' to force it"}
    return out


def needs_data(chosen: dict) -> bool:
    return any(k not in DATA_FREE for k in chosen)


def run(prepared, samples, chosen: dict, progress=None) -> dict:
    """Run the chosen algorithms on ``prepared.gm`` in order; returns ``{name: summary}``."""
    from .ir import get_attr_value
    from .passes.weight_only import weighted_layers
    gm, report = prepared.gm, {}
    timings = prepared._ctx.timings
    reference = None
    for name, cfg in chosen.items():
        t0 = time.perf_counter()
        if name == "exact_input":  # applied at capture (pipeline.exact_input_passes); reported here
            if meta.EXACT_INPUT.get(gm):
                report[name] = meta.EXACT_INPUT.get(gm)
            continue
        if name == "smoothquant":
            report[name] = _smoothquant(prepared, samples)
        elif name == "equalize":
            report[name] = _equalize(gm, samples)
        elif name in ROUNDINGS:
            nodes = {n.name: n for n in gm.graph.nodes}
            reference = {nodes[layer.weight].target: get_attr_value(gm, nodes[layer.weight]).detach().clone()
                         for layer in weighted_layers(gm)}
            report[name] = _round(gm, samples, name, cfg, progress)
        elif name == "bias_correction":
            from .passes.bias_correction import BiasCorrection
            report[name] = {"corrected_layers": len(BiasCorrection(reference)(gm, samples))}
        timings[f"{name}_s"] = time.perf_counter() - t0
        if name in ROUNDINGS:
            timings["weight_rounding_s"] = timings[f"{name}_s"]
    meta.ALGORITHMS.set(gm, {**meta.ALGORITHMS.get(gm, {}), **report})
    return report


def _equalize(gm, samples) -> dict:
    from .passes.calibration_stats import collect
    from .passes.equalize import CrossLayerEqualization, stats_axes, stats_nodes
    names = stats_nodes(gm)
    stats = collect(gm, names, samples, stats_axes(gm)) if names else {}
    CrossLayerEqualization(stats)(gm)
    rep = meta.EQUALIZATION.get(gm)
    return {"pairs": len(rep["pairs"]), "skipped": len(rep["skipped"]),
            "bias_absorbed_channels": sum(p["bias_absorbed_channels"] for p in rep["pairs"])}


def _smoothquant(prepared, samples) -> dict:
    from .passes.smoothquant import SmoothQuant
    from .report import build_rows
    gm = prepared.gm
    SmoothQuant(samples)(gm)
    rep = meta.SMOOTHQUANT.get(gm)
    known = {r.name for r in prepared._ctx.rows}
    for row in build_rows(gm):  # the residual muls it added: float, named in the report with the reason
        if row.name not in known and row.op == "mul":
            row.reason = "SmoothQuant: restores the residual stream's scale after its LayerNorm was smoothed"
            prepared._ctx.rows.append(row)
    smoothed = [g for g in rep["groups"] if g["alpha"] > 0]
    return {"smoothed_norms": len(smoothed), "groups": len(rep["groups"]), "skipped": len(rep["skipped"]),
            "residual_muls": sum(g["residual_muls"] for g in smoothed),
            "alphas": sorted({g["alpha"] for g in smoothed})}


def _round(gm, samples, name, cfg, progress) -> dict:
    if name == "gptq":
        from .gptq import GPTQConfig
        from .passes.weight_only import GPTQRounding
        stats = GPTQRounding(cfg or GPTQConfig())(gm, samples)
    elif name == "greedy_rounding":
        from .passes.adaround import GreedyRounding, GreedyRoundingConfig
        stats = GreedyRounding(cfg or GreedyRoundingConfig(), progress=progress)(gm, samples)
    else:
        from .passes.adaround import AdaRound, AdaRoundConfig
        stats = AdaRound(cfg or AdaRoundConfig(), progress=progress)(gm, samples)
    kept = sum(1 for s in stats.values() if s.get("algorithm") == name)
    out = {"layers": len(stats), "kept": kept, "round_to_nearest": len(stats) - kept}
    if getattr(cfg, "upstream", False):
        out["objective"] = "upstream: each layer's Q x fitted to the float model's W x_float"
    return out
