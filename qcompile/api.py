"""Public entry points: compile / prepare / convert / explain. Orchestration only."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from . import annotation as A
from .artifact import Artifact
from .backends import get_backend
from .config import QConfig, make_config, validate
from .errors import CalibrationError, ConfigError
from .passes.capture import CapturedInputs, capture
from .passes.convert import ConvertToReference
from .passes.infra import PassManager
from .passes.insert_observers import InsertObservers
from .report import Report, build_rows
from .validate import (check_calibration, check_call_args, check_options, check_sample, names_list, sample_to_inputs,
                       warn_if_training)

MODES = ("static", "dynamic", "weight_only", "qat")
FLOAT_MODES = ("dynamic", "weight_only")  # nothing to observe: weights quantized at convert, activations at run time


@dataclass
class Context:
    backend: object
    config: QConfig
    mode: str
    strict: bool
    allow_float: frozenset
    inputs: CapturedInputs
    float_gm: fx.GraphModule
    rows: list
    timings: dict = field(default_factory=dict)
    pass_log: list = field(default_factory=list)


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
        from tqdm.auto import tqdm
        check_calibration(data)
        seen = 0
        with torch.no_grad():
            for sample in tqdm(data, desc="calibrating", disable=progress is False if progress is not None else None,
                               leave=False):
                args, kwargs = sample_to_inputs(sample, self._ctx.inputs, self.num_calibration_samples,
                                                _input_names(self.gm))
                self(*args, **kwargs)
                seen += 1
        if seen == 0:
            raise CalibrationError("the calibration iterable was empty: pass at least one sample "
                                   "(a tensor, a tuple of positional inputs, or a dict of keyword inputs)")
        return self


def _input_names(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


@dataclass(frozen=True)
class Options:
    """Every keyword option of compile / prepare / explain, validated in one place."""

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

    @classmethod
    def parse(cls, kwargs: dict) -> "Options":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; valid options: {sorted(known)}")
        kw = dict(kwargs)
        kw["exclude"] = names_list(kw.get("exclude"), "exclude")
        kw["allow_float"] = frozenset(names_list(kw.get("allow_float"), "allow_float"))
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


def _setup(model, example_inputs, backend, opts: Options, train: bool = False):
    be = get_backend(backend, **(opts.backend_options or {}))
    cfg = make_config(opts.config, opts.weights, opts.activations, opts.exclude, opts.quantize_outputs)
    validate(cfg, _by_mode(be.capabilities, opts.mode), be.name, opts.mode)
    d = _by_mode(be.default_config, opts.mode)
    cfg = cfg.with_defaults(d.weights, d.activations, d.quantize_outputs)
    t0 = time.perf_counter()
    gm = capture(model, example_inputs, opts.example_kwargs, train=train)
    t1 = time.perf_counter()
    float_gm = copy.deepcopy(gm)
    pm = PassManager(be.prepare_passes(cfg, opts.mode) if _takes_mode(be) else be.prepare_passes(cfg))
    gm = pm(gm).graph_module
    rows = build_rows(gm)
    ctx = Context(be, cfg, opts.mode, opts.strict, opts.allow_float, gm.meta["qcompile_inputs"], float_gm, rows,
                  {"capture_s": t1 - t0, "prepare_passes_s": time.perf_counter() - t1}, pm.log)
    return gm, ctx


def _takes_mode(backend) -> bool:
    import inspect
    return "mode" in inspect.signature(backend.prepare_passes).parameters


def _by_mode(fn, mode: str):
    import inspect
    return fn(mode=mode) if "mode" in inspect.signature(fn).parameters else fn()


def prepare(model: nn.Module, example_inputs, backend="x86", **options) -> PreparedModel:
    """Capture, run the backend's prepare passes and insert observers. The user's model is not touched.

    Options: config, weights, activations, exclude, mode, strict, allow_float, example_kwargs,
    backend_options, quantize_outputs (see :class:`Options`)."""
    from .observers import make_observer
    opts = Options.parse(options)
    check_call_args(backend, None, True, None)
    if isinstance(model, nn.Module):
        warn_if_training(model, opts.mode)
    gm, ctx = _setup(model, example_inputs, backend, opts)
    if opts.strict:
        _report(ctx, predicted=True).check_strict(ctx.allow_float)
    t0 = time.perf_counter()
    if opts.mode not in FLOAT_MODES:
        gm = PassManager([InsertObservers(make_observer)])(gm).graph_module
    ctx.timings["insert_observers_s"] = time.perf_counter() - t0
    return PreparedModel(gm, ctx)


def _report(ctx: Context, predicted=False) -> Report:
    return Report(ctx.backend.name, ctx.backend.runtime_name(), ctx.mode, copy.deepcopy(ctx.rows),
                  ctx.config.describe(), predicted=predicted)


def convert(prepared: PreparedModel, verify: bool = True, verify_data=None, *, _held_out_source=None) -> Artifact:
    """Observed (or QAT-trained) model -> reference graph -> backend artifact, with the coverage report.
    ``verify_data``: held-out samples (not calibrated on) the report verifies on: SQNR and parity as a
    distribution, per-layer SQNR, activation histograms and calibration health (see docs/evaluate.md)."""
    from .health import after_calibration
    from .qat import QATModel, convert_qat
    if isinstance(prepared, QATModel):
        return convert_qat(prepared, verify=verify)
    if not isinstance(prepared, PreparedModel):
        raise ConfigError(f"convert() takes the model returned by qcompile.prepare() or qcompile.prepare_qat(), "
                          f"got {type(prepared).__name__}")
    ctx = prepared._ctx
    if ctx.mode == "static" and prepared.num_calibration_samples == 0:
        raise CalibrationError("no calibration data reached the prepared model: run samples through it "
                               "(or call prepared.calibrate(loader)) before convert()")
    t0 = time.perf_counter()
    ref = copy.deepcopy(prepared.gm)
    ref = PassManager([ConvertToReference()])(ref).graph_module
    ctx.timings["convert_s"] = time.perf_counter() - t0
    art = Artifact.build(ref, ctx.backend, ctx, verify=verify)
    _attach_storage(art, ctx, ref)
    for h in prepared._range_hooks:
        h.remove()
    if verify:
        held_out = list(verify_data) if verify_data is not None else []
        source = _held_out_source or ("verify_data" if held_out else "example inputs only (give verify_data=)")
        after_calibration(art, prepared, held_out, source, prepared._ranges, prepared.num_calibration_samples)
    return art


def _attach_storage(art: Artifact, ctx: Context, ref: fx.GraphModule) -> None:
    """Stored bytes per tensor / bits per weight of the lowered model, and the weight-rounding stats."""
    from .passes.weight_only import ROUNDING
    from .report import storage_rows, storage_summary
    art.report.weight_rounding = dict(ref.meta.get(ROUNDING, {}))
    art.report.algorithms = dict(ref.meta.get("qcompile_algorithms", {}))
    gm = getattr(art.lowered, "gm", None)
    if not isinstance(gm, fx.GraphModule):
        return
    art.report.storage = storage_rows(gm, getattr(art.lowered, "storage", None))
    tensors = {id(t): t for t in list(ctx.float_gm.parameters()) + list(ctx.float_gm.buffers())}.values()
    art.report.sizes.update(storage_summary(art.report.storage, sum(t.numel() * t.element_size() for t in tensors)))


class _Samples:
    """A re-iterable view of the calibration data as (args, kwargs), read once per GPTQ round."""

    def __init__(self, data, expected, names):
        self.data, self.expected, self.names = data, expected, names

    def __iter__(self):
        for i, s in enumerate(self.data):
            args, kwargs = sample_to_inputs(s, self.expected, i, self.names)
            check_sample(args, kwargs, self.expected, i)
            yield args, kwargs


def _run_algorithms(prepared: PreparedModel, calibration, opts: Options, progress) -> None:
    """Equalization / SmoothQuant / weight rounding / bias correction on the prepared graph, before the
    observers see data (so they calibrate the transformed model). See qcompile.algorithms."""
    from . import algorithms
    weights = prepared._ctx.config.weights
    chosen = opts.algorithms(getattr(weights, "bits", None))
    if not chosen or not algorithms.needs_data(chosen):
        return
    if calibration is None:
        raise CalibrationError(f"algorithm={sorted(chosen)} needs calibration=<iterable of samples>: the passes "
                               f"measure the layers' inputs on it (or pass algorithm=None)")
    algorithms.run(prepared, _Samples(calibration, prepared._ctx.inputs, _input_names(prepared.gm)), chosen, progress)


def compile(model: nn.Module, example_inputs, backend="x86", *, calibration=None, verify: bool = True,
            progress=None, verify_data=None, accuracy=None, **options) -> Artifact:
    """Quantize ``model`` for ``backend``. Static mode needs ``calibration`` (an iterable of samples:
    tensors, tuples of positional inputs or dicts of keyword inputs). ``verify_data``: held-out samples the
    report verifies on (default: the last 1/8, at most 4, of a calibration list of >= 8 samples, which
    are then not calibrated on). ``accuracy=qcompile.AccuracyBudget(...)``: move layers back to higher precision until it
    holds. Other options: see :class:`Options`."""
    from .health import split_holdout
    opts = Options.parse(options)
    check_call_args(backend, calibration, verify, progress)
    if accuracy is not None:
        from .budget import search
        calibration = list(calibration) if calibration is not None else None
        return search(model, example_inputs, backend, calibration, accuracy, **options)
    if opts.mode == "static" and calibration is None:
        raise CalibrationError("static quantization needs calibration=<iterable of samples> "
                               "(or use mode='dynamic' / 'weight_only', which need none)")
    if opts.gptq and calibration is None:
        raise CalibrationError("algorithm='gptq' needs calibration=<iterable of samples>: its Hessians come from "
                               "the layers' calibration inputs (use algorithm='rtn' for round-to-nearest)")
    if calibration is not None and iter(calibration) is calibration:
        calibration = list(calibration)  # the algorithms read the samples more than once
    calibration, held_out, held_out_source = split_holdout(calibration, verify_data)
    prepared = prepare(model, example_inputs, backend, **options)
    _run_algorithms(prepared, calibration, opts, progress)
    t0 = time.perf_counter()
    if calibration is not None and opts.mode not in FLOAT_MODES:
        prepared.calibrate(calibration, progress=progress)
    prepared._ctx.timings["calibration_s"] = time.perf_counter() - t0
    return convert(prepared, verify=verify, verify_data=held_out, _held_out_source=held_out_source)


def explain(model: nn.Module, example_inputs, backend="x86", **options) -> Report:
    """Predict coverage (what will be int8 and what float, and why) before any calibration."""
    opts = Options.parse(options)
    check_call_args(backend, None, True, None)
    _, ctx = _setup(model, example_inputs, backend, opts)
    return _report(ctx, predicted=True)
