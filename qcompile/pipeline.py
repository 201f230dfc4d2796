"""The one pipeline: options, context, setup (backend, config, capture, prepare passes), convert (reference
graph, lowering, verification) and the report. ``compile`` / ``prepare`` / ``convert`` / ``explain``
(api.py), ``prepare_qat`` / ``convert_qat`` (qat.py) and ``load`` (loading.py) are thin calls into it.

    setup:   backend + config -> capture -> [after_capture hooks] -> backend.prepare_passes(config, mode)
             -> [after_annotate hooks] -> rows of the coverage report
    convert: ConvertToReference -> finish
    finish:  [before_lower hooks] -> backend.lower(reference, inputs, mode) -> report -> verify -> strict
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from . import meta
from .artifact import Artifact, flag_numerics
from .backends import get_backend
from .config import QConfig, make_config, validate
from .errors import CalibrationError, ConfigError
from .passes.capture import CapturedInputs, capture
from .passes.convert import ConvertToReference
from .passes.infra import FunctionPass, Pass, PassManager
from .report import Report, apply_lowering, build_rows, storage_rows, storage_summary
from .validate import check_options, check_sample, names_list, sample_to_inputs

MODES = ("static", "dynamic", "weight_only", "qat")
FLOAT_MODES = ("dynamic", "weight_only")  # nothing to observe: weights quantized at convert, activations at run time
HOOKS = {
    "after_capture": "the captured ATen graph, before the backend's prepare passes (normalize, fold, annotate)",
    "after_annotate": "the annotated graph, before observers / fake-quants (keep_float re-marks a group float)",
    "before_lower": "the quantize / dequantize reference graph, before backend.lower",
}


@dataclass(frozen=True)
class Options:
    """Every keyword option of compile / prepare / explain / prepare_qat, validated in one place.
    ``passes``: {hook name: [Pass or fn(gm) -> modified]} run at the hooks of :data:`HOOKS`."""

    config: QConfig | None = None
    weights: object = None
    activations: object = None
    exclude: tuple = ()
    mode: str = "static"
    strict: bool = False
    allow_float: frozenset = frozenset()
    example_kwargs: dict | None = None
    backend_options: dict | None = None
    quantize_outputs: bool | None = None
    algorithm: str | None = None
    passes: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, kwargs: dict) -> "Options":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; valid options: {sorted(known)}")
        kw = dict(kwargs)
        kw["exclude"] = names_list(kw.get("exclude"), "exclude")
        kw["allow_float"] = frozenset(names_list(kw.get("allow_float"), "allow_float"))
        kw["passes"] = hook_passes(kw.get("passes"))
        opts = cls(**kw)
        check_options(opts)
        if opts.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {opts.mode!r}")
        from . import algorithms
        algorithms.normalize(opts.algorithm)  # ConfigError for an unknown algorithm
        return opts

    @property
    def gptq(self) -> bool:
        from . import algorithms
        return "gptq" in (algorithms.normalize(self.algorithm) or {})

    def algorithms(self, weight_bits: int | None) -> dict:
        """The accuracy algorithms to run ("recommended" expanded for the mode and weight width)."""
        from . import algorithms
        return algorithms.resolve(self.algorithm, self.mode, weight_bits)


def hook_passes(value) -> dict:
    """``passes=`` as {hook: tuple of Pass}; unknown hook names and non-passes raise ConfigError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"passes must be a dict {{hook name: [passes]}} with hooks {list(HOOKS)}, "
                          f"got {type(value).__name__}")
    unknown = sorted(set(value) - set(HOOKS))
    if unknown:
        raise ConfigError(f"unknown pass hook(s) {unknown}; valid hooks: {list(HOOKS)}")
    out = {}
    for hook, passes in value.items():
        passes = [passes] if isinstance(passes, Pass) or callable(passes) else list(passes)
        bad = [p for p in passes if not (isinstance(p, Pass) or callable(p))]
        if bad:
            raise ConfigError(f"passes[{hook!r}]: {bad[0]!r} is neither a qcompile.passes.Pass nor a function "
                              f"fn(gm) -> modified")
        out[hook] = tuple(p if isinstance(p, Pass) else FunctionPass(p) for p in passes)
    return out


@dataclass
class Context:
    """What a prepared model carries to convert: backend, config, mode, the captured inputs, the float
    graph (verification compares against it), the report rows, timings, the pass log and the hooks."""

    backend: object
    config: QConfig
    mode: str
    strict: bool
    allow_float: frozenset
    inputs: CapturedInputs
    float_gm: fx.GraphModule | None
    rows: list
    timings: dict = field(default_factory=dict)
    pass_log: list = field(default_factory=list)
    hooks: dict = field(default_factory=dict)


class PreparedModel(nn.Module):
    """An observed model: run calibration data through it (or call :meth:`calibrate`), then convert."""

    def __init__(self, gm: fx.GraphModule, ctx: Context):
        super().__init__()
        from .health import install_range_tracking
        self.gm, self._ctx, self.num_calibration_samples = gm, ctx, 0
        self._ranges, self._range_hooks = install_range_tracking(gm)  # calibration health (qcompile.health)

    def forward(self, *args, **kwargs):
        check_sample(args, kwargs, self._ctx.inputs, self.num_calibration_samples)
        self.num_calibration_samples += 1
        return self.gm(*args, **kwargs)

    def calibrate(self, data, progress: bool | None = None) -> "PreparedModel":
        """Run ``data`` through the observers. The first call runs the accuracy algorithms of the ``algorithm=``
        option on ``data`` first (static mode's defaults: bias correction...), as ``compile`` does; calling the
        prepared model yourself only calibrates."""
        from tqdm.auto import tqdm
        from .validate import check_calibration
        check_calibration(data)
        opts = self.__dict__.pop("_pending_algorithms", None)
        if opts is not None and self.num_calibration_samples == 0:
            data = reiterable(data)  # the algorithms read it more than once
            run_algorithms(self, data, opts, progress)
        seen = 0
        with torch.no_grad():
            for sample in tqdm(data, desc="calibrating", disable=progress is False if progress is not None else None,
                               leave=False):
                args, kwargs = sample_to_inputs(sample, self._ctx.inputs, self.num_calibration_samples,
                                                input_names(self.gm))
                self(*args, **kwargs)
                seen += 1
        if seen == 0:
            raise empty_calibration()
        return self


def empty_calibration() -> CalibrationError:
    return CalibrationError("the calibration iterable was empty: pass at least one sample "
                            "(a tensor, a tuple of positional inputs, or a dict of keyword inputs)")


_NOTHING = object()


def reiterable(data):
    """Calibration ``data`` that can be read more than once (an iterator becomes a list); CalibrationError
    when it holds no sample, before any algorithm reads it."""
    data = list(data) if iter(data) is data else data
    if next(iter(data), _NOTHING) is _NOTHING:
        raise empty_calibration()
    return data


def input_names(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


# -- setup ------------------------------------------------------------------------------------------
def backend_and_config(backend, opts: Options):
    """The backend and the user's config validated against ``capabilities(mode)`` and completed with
    ``default_config(mode)``. QAT trains a static int8 graph: it is validated as static."""
    be = get_backend(backend, **(opts.backend_options or {}))
    cfg = make_config(opts.config, opts.weights, opts.activations, opts.exclude, opts.quantize_outputs)
    caps = be.capabilities(opts.mode)
    if opts.mode == "qat":
        if "qat" not in caps.modes and "static" not in caps.modes:
            raise ConfigError(f"backend {be.name!r} runs neither static int8 nor QAT (modes {list(caps.modes)})")
        validate(cfg, dataclasses.replace(caps, modes=("static",)), be.name, "static")
    else:
        validate(cfg, caps, be.name, opts.mode)
    d = be.default_config(opts.mode)
    return be, cfg.with_defaults(d.weights, d.activations, d.quantize_outputs)


def setup(model, example_inputs, backend, opts: Options, prepare_passes=None,
          check_strict: bool = True) -> tuple[fx.GraphModule, Context]:
    """Capture and run the prepare passes. ``prepare_passes(backend_passes) -> passes`` lets QAT swap
    passes of the backend's list (batch-norm folding becomes the conv-BN collapse). ``strict=True`` raises
    here already when the annotation predicts a float fallback (not for explain, which reports it)."""
    be, cfg = backend_and_config(backend, opts)
    train = opts.mode == "qat"
    t0 = time.perf_counter()
    gm = capture(model, example_inputs, opts.example_kwargs, train=train)
    t1 = time.perf_counter()
    float_gm = None if train else copy.deepcopy(gm)
    passes = be.prepare_passes(cfg, opts.mode)
    passes = prepare_passes(passes) if prepare_passes is not None else passes
    hooks = opts.passes
    pm = PassManager([*hooks.get("after_capture", ()), *passes, *hooks.get("after_annotate", ())])
    gm = pm(gm).graph_module
    ctx = Context(be, cfg, opts.mode, opts.strict, opts.allow_float, meta.INPUTS.get(gm), float_gm,
                  build_rows(gm), {"capture_s": t1 - t0, "prepare_passes_s": time.perf_counter() - t1}, pm.log,
                  hooks)
    if opts.strict and check_strict:
        predicted_report(ctx).check_strict(ctx.allow_float)
    return gm, ctx


def predicted_report(ctx: Context) -> Report:
    """The coverage the annotation predicts (explain, strict checks before calibration)."""
    return Report(ctx.backend.name, ctx.backend.runtime_name(), ctx.mode, copy.deepcopy(ctx.rows),
                  ctx.config.describe(), predicted=True)


# -- convert ----------------------------------------------------------------------------------------
def convert(gm: fx.GraphModule, ctx: Context, verify: bool = True) -> Artifact:
    """Observed graph -> reference graph -> lowered artifact (the observed graph is not changed)."""
    t0 = time.perf_counter()
    ref = PassManager([ConvertToReference()])(copy.deepcopy(gm)).graph_module
    ctx.timings["convert_s"] = time.perf_counter() - t0
    return finish(ref, ctx, verify)


def finish(ref: fx.GraphModule, ctx: Context, verify: bool = True) -> Artifact:
    """Reference graph -> [before_lower hooks] -> backend.lower -> the artifact with its report."""
    t0 = time.perf_counter()
    before = ctx.hooks.get("before_lower", ())
    if before:
        pm = PassManager(list(before))
        ref = pm(ref).graph_module
        ctx.pass_log = ctx.pass_log + pm.log
    lowered = ctx.backend.lower(ref, ctx.inputs, ctx.mode)
    report = build_report(ref, lowered, ctx, time.perf_counter() - t0)
    options = ctx.backend.options
    meta = {"backend": ctx.backend.name, "options": {f.name: getattr(options, f.name) for f in dataclasses.fields(options)},
            "mode": ctx.mode, "n_args": len(ctx.inputs.args), "kwargs": sorted(ctx.inputs.kwargs)}
    if ctx.backend.user_rules:  # a file cannot carry code: load() lowers without them
        meta["user_rules"] = [r.name for r in ctx.backend.user_rules]
    art = Artifact(ctx.backend, ref, lowered, report, ctx.inputs, meta)
    if verify:
        report.verify = art.verify(float_model=ctx.float_gm)
        flag_numerics(report, ctx.strict)
    if ctx.strict:
        report.check_strict(ctx.allow_float)
    return art


def build_report(ref: fx.GraphModule, lowered, ctx: Context, lower_s: float) -> Report:
    """THE report of a lowered artifact: rows with what the runtime runs, timings, sizes, stored bytes,
    weight rounding and algorithm notes (compile, convert, convert_qat and load all come here)."""
    be = ctx.backend
    config = ctx.config.describe() if hasattr(ctx.config, "describe") else ctx.config
    report = Report(be.name, be.runtime_name(), ctx.mode, copy.deepcopy(ctx.rows), config)
    apply_lowering(report.rows, lowered.kernels, lowered.fallbacks, be.runtime_name())
    report.timings = dict(ctx.timings, lower_s=lower_s)
    report.sizes = reference_sizes(ref)
    report.weight_rounding = dict(meta.WEIGHT_ROUNDING.get(ref, {}))
    report.algorithms = dict(meta.ALGORITHMS.get(ref, {}))
    if isinstance(lowered.gm, fx.GraphModule):
        report.storage = storage_rows(lowered.gm, lowered.storage or None)
        float_bytes = None
        if ctx.float_gm is not None:
            tensors = {id(t): t for t in list(ctx.float_gm.parameters()) + list(ctx.float_gm.buffers())}.values()
            float_bytes = sum(t.numel() * t.element_size() for t in tensors)
        report.sizes.update(storage_summary(report.storage, float_bytes))
    return report


def reference_sizes(ref: fx.GraphModule) -> dict:
    float_bytes = int_bytes = 0
    for _, t in list(ref.named_buffers()) + list(ref.named_parameters()):
        if t.dtype in (torch.int8, torch.uint8):
            int_bytes += t.numel() * t.element_size()
        elif t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64):
            float_bytes += t.numel() * t.element_size()
    total = float_bytes + int_bytes
    return {"int8_weight_bytes": int_bytes, "other_bytes": float_bytes, "total_bytes": total,
            "int8_share_of_bytes": round(int_bytes / total, 4) if total else 0.0}


def loaded_context(backend, ref_inputs: CapturedInputs | None, mode: str, config, rows: list) -> Context:
    """The context of an artifact read back from a file (no float model, nothing to check strictly)."""
    return Context(backend, config, mode, False, frozenset(), ref_inputs, None, rows)


# -- prepare / compile ------------------------------------------------------------------------------
def prepare(model, example_inputs, backend, opts: Options) -> PreparedModel:
    """setup + observers (PTQ static; dynamic / weight-only graphs have nothing to observe)."""
    from .observers import make_observer
    from .passes.insert_observers import InsertObservers
    from .validate import warn_if_training
    if isinstance(model, nn.Module):
        warn_if_training(model, opts.mode)
    gm, ctx = setup(model, example_inputs, backend, opts)
    t0 = time.perf_counter()
    if opts.mode not in FLOAT_MODES:
        gm = PassManager([InsertObservers(make_observer)])(gm).graph_module
    ctx.timings["insert_observers_s"] = time.perf_counter() - t0
    prepared = PreparedModel(gm, ctx)
    prepared._pending_algorithms = opts  # run by the first calibrate(data) (compile runs them itself)
    return prepared


def convert_prepared(prepared: PreparedModel, verify: bool = True, verify_data=None,
                     held_out_source: str | None = None) -> Artifact:
    """convert + the held-out report: ``verify_data`` (not calibrated on) gives SQNR and parity as a
    distribution, per-layer SQNR, activation histograms and calibration health (docs/evaluate.md)."""
    from .health import after_calibration
    if prepared._ctx.mode == "static" and prepared.num_calibration_samples == 0:
        raise CalibrationError("no calibration data reached the prepared model: run samples through it "
                               "(or call prepared.calibrate(loader)) before convert()")
    art = convert(prepared.gm, prepared._ctx, verify)
    for h in prepared._range_hooks:
        h.remove()
    if verify:
        held_out = list(verify_data) if verify_data is not None else []
        source = held_out_source or ("verify_data" if held_out else "example inputs only (give verify_data=)")
        after_calibration(art, prepared, held_out, source, prepared._ranges, prepared.num_calibration_samples)
    return art


class _Samples:
    """A re-iterable view of the calibration data as (args, kwargs), read once per GPTQ round."""

    def __init__(self, data, expected, names):
        self.data, self.expected, self.names = data, expected, names

    def __iter__(self):
        for i, s in enumerate(self.data):
            args, kwargs = sample_to_inputs(s, self.expected, i, self.names)
            check_sample(args, kwargs, self.expected, i)
            yield args, kwargs


def run_algorithms(prepared: PreparedModel, calibration, opts: Options, progress) -> None:
    """Equalization / SmoothQuant / weight rounding / bias correction on the prepared graph, before the
    observers see data (so they calibrate the transformed model). See qcompile.algorithms."""
    from . import algorithms
    weights = prepared._ctx.config.weights
    chosen = opts.algorithms(getattr(weights, "bits", None))
    few = algorithms.too_few_for_default(opts.algorithm, chosen, calibration)
    if few:
        for name in few:
            chosen.pop(name)
        meta.ALGORITHMS.set(prepared.gm, {**meta.ALGORITHMS.get(prepared.gm, {}), **few})  # says why it did not run
    if not chosen or not algorithms.needs_data(chosen):
        return
    if calibration is None:
        raise CalibrationError(f"algorithm={sorted(chosen)} needs calibration=<iterable of samples>: the passes "
                               f"measure the layers' inputs on it (or pass algorithm='rtn')")
    algorithms.run(prepared, _Samples(calibration, prepared._ctx.inputs, input_names(prepared.gm)), chosen, progress)


def compile_model(model, example_inputs, backend, opts: Options, calibration=None, verify: bool = True,
                  progress=None, verify_data=None, float_weights: dict | None = None) -> Artifact:
    """prepare -> accuracy algorithms -> calibrate -> convert -> held-out verification and health.
    ``float_weights``: a dict filled with {conv / linear node name: its float weight as convert reads it}
    (after folding and the algorithms; the accuracy budget's proxy puts them back one layer at a time)."""
    from .health import split_holdout
    if opts.mode == "static" and calibration is None:
        raise CalibrationError("static quantization needs calibration=<iterable of samples> "
                               "(or use mode='dynamic' / 'weight_only', which need none)")
    if opts.gptq and calibration is None:
        raise CalibrationError("algorithm='gptq' needs calibration=<iterable of samples>: its Hessians come from "
                               "the layers' calibration inputs (use algorithm='rtn' for round-to-nearest)")
    if calibration is not None:
        from .validate import check_calibration
        check_calibration(calibration)
        calibration = reiterable(calibration) if opts.mode not in FLOAT_MODES else \
            list(calibration) if iter(calibration) is calibration else calibration  # read more than once
    calibration, held_out, held_out_source = split_holdout(calibration, verify_data)
    opts = exact_input_passes(opts, calibration)
    prepared = prepare(model, example_inputs, backend, opts)
    del prepared._pending_algorithms  # run here, before calibration (float modes calibrate nothing)
    run_algorithms(prepared, calibration, opts, progress)
    t0 = time.perf_counter()
    if calibration is not None and opts.mode not in FLOAT_MODES:
        calibrate_and_choose(prepared, calibration, progress)
    prepared._ctx.timings["calibration_s"] = time.perf_counter() - t0 - prepared._ctx.timings.get("range_choice_s", 0.0)
    if float_weights is not None:
        float_weights.update(gemm_weights(prepared.gm))
    return convert_prepared(prepared, verify, held_out, held_out_source)


def calibrate_and_choose(prepared: PreparedModel, calibration, progress) -> None:
    """Calibrate; with ``observer="auto"`` activations also choose each one's calibration method by the output
    error it gives (passes/range_choice.py), reported as ``report.algorithms["range_choice"]``. The choice is
    made on the last ``min(4, n // 2)`` samples of a calibration list with the observers calibrated on the
    others (a range judged on the samples it was fitted to favours clipping: measured), then those samples
    are calibrated on too. Other iterables: judged on their first samples."""
    from .passes.range_choice import HOLD_BACK, MAX_SAMPLES, auto_observers, choose_ranges
    wants = any(getattr(m, "method", None) == "auto" for m in prepared.gm.modules())
    split = HOLD_BACK and isinstance(calibration, (list, tuple)) and len(calibration) >= 2 and wants
    k = min(MAX_SAMPLES, len(calibration) // 2) if split else 0
    prepared.calibrate(calibration[:-k] if split else calibration, progress=progress)
    if not wants or not auto_observers(prepared.gm):
        return
    t0 = time.perf_counter()
    judged = calibration[-k:] if split else calibration
    rep = choose_ranges(prepared.gm, _Samples(judged, prepared._ctx.inputs, input_names(prepared.gm)))
    rep["judged_on"] = f"{k} held-back calibration samples" if split else "calibration samples (in-sample)"
    meta.ALGORITHMS.set(prepared.gm, {**meta.ALGORITHMS.get(prepared.gm, {}), "range_choice": rep})
    prepared._ctx.timings["range_choice_s"] = time.perf_counter() - t0
    if split:
        prepared.calibrate(calibration[-k:], progress=progress)


def exact_input_passes(opts: Options, calibration) -> Options:
    """``opts`` with passes/input_lattice.py's two passes hooked in when "exact_input" is among the algorithms
    and the calibration samples' single 4-D input lies on an 8-bit pixel lattice (asked for by name and not
    applicable, the report says why)."""
    from . import algorithms
    from .passes import input_lattice
    if opts.mode != "static" or calibration is None:
        return opts
    if "exact_input" not in algorithms.resolve(opts.algorithm, opts.mode, None):
        return opts
    named = "exact_input" in (algorithms.normalize(opts.algorithm) or {})
    samples = []
    for i, s in enumerate(calibration):
        if i >= input_lattice.MAX_SAMPLES:
            break
        x = s if isinstance(s, torch.Tensor) else s[0] if isinstance(s, (tuple, list)) and len(s) == 1 else None
        samples.append(x)
    lattice, why = input_lattice.detect(samples)
    if lattice is None and not named:
        return opts
    hooks = dict(opts.passes)
    hooks["after_capture"] = [input_lattice.AlignInputLattice(lattice, why)] + list(hooks.get("after_capture", ()))
    hooks["after_annotate"] = list(hooks.get("after_annotate", ())) + [input_lattice.MarkExactInput()]
    return dataclasses.replace(opts, passes=hooks)


def gemm_weights(gm: fx.GraphModule) -> dict:
    """{conv / linear node name: a copy of its float weight constant}."""
    from .ir import get_attr_value
    from .passes.pattern import op_kind
    out = {}
    for n in gm.graph.nodes:
        if op_kind(n) in ("conv2d", "conv1d", "linear") and len(n.args) > 1 and \
                isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr":
            out[n.name] = get_attr_value(gm, n.args[1]).detach().clone()
    return out
