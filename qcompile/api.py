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

MODES = ("static", "dynamic", "weight_only", "qat")


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
        self.gm, self._ctx, self.num_calibration_samples = gm, ctx, 0

    def forward(self, *args, **kwargs):
        self.num_calibration_samples += 1
        return self.gm(*args, **kwargs)

    def calibrate(self, data, progress: bool | None = None) -> "PreparedModel":
        from tqdm.auto import tqdm
        n_inputs = len(self._ctx.inputs.args)
        seen = 0
        with torch.no_grad():
            for sample in tqdm(data, desc="calibrating", disable=progress is False if progress is not None else None,
                               leave=False):
                args, kwargs = _sample_to_inputs(sample, n_inputs)
                self(*args, **kwargs)
                seen += 1
        if seen == 0:
            raise CalibrationError("the calibration iterable was empty: pass at least one sample "
                                   "(a tensor, a tuple of positional inputs, or a dict of keyword inputs)")
        return self


def _sample_to_inputs(sample, n_inputs: int):
    if isinstance(sample, torch.Tensor):
        return (sample,), {}
    if isinstance(sample, dict):
        return (), sample
    if isinstance(sample, (tuple, list)):
        if n_inputs and len(sample) != n_inputs:
            raise CalibrationError(
                f"a calibration sample has {len(sample)} elements but the model takes {n_inputs} positional "
                f"input(s); for (input, label) pairs pass calibration=(x for x, _ in loader)")
        return tuple(sample), {}
    raise CalibrationError(f"calibration samples must be tensors, tuples or dicts, got {type(sample).__name__}")


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
        kw["exclude"] = tuple(kw.get("exclude") or ())
        kw["allow_float"] = frozenset(kw.get("allow_float") or ())
        opts = cls(**kw)
        if opts.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {opts.mode!r}")
        return opts


def _setup(model, example_inputs, backend, opts: Options, train: bool = False):
    be = get_backend(backend, **(opts.backend_options or {}))
    cfg = make_config(opts.config, opts.weights, opts.activations, opts.exclude, opts.quantize_outputs)
    validate(cfg, be.capabilities(), be.name, opts.mode)
    d = be.default_config()
    cfg = cfg.with_defaults(d.weights, d.activations)
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


def prepare(model: nn.Module, example_inputs, backend="x86", **options) -> PreparedModel:
    """Capture, run the backend's prepare passes and insert observers. The user's model is not touched.

    Options: config, weights, activations, exclude, mode, strict, allow_float, example_kwargs,
    backend_options, quantize_outputs (see :class:`Options`)."""
    from .observers import make_observer
    opts = Options.parse(options)
    gm, ctx = _setup(model, example_inputs, backend, opts)
    if opts.strict:
        _report(ctx, predicted=True).check_strict(ctx.allow_float)
    t0 = time.perf_counter()
    gm = PassManager([InsertObservers(make_observer)])(gm).graph_module
    ctx.timings["insert_observers_s"] = time.perf_counter() - t0
    return PreparedModel(gm, ctx)


def _report(ctx: Context, predicted=False) -> Report:
    return Report(ctx.backend.name, ctx.backend.runtime_name(), ctx.mode, copy.deepcopy(ctx.rows),
                  ctx.config.describe(), predicted=predicted)


def convert(prepared: PreparedModel, verify: bool = True) -> Artifact:
    """Observed model -> reference graph -> backend artifact, with the coverage report."""
    if not isinstance(prepared, PreparedModel):
        raise ConfigError(f"convert() takes the model returned by qcompile.prepare(), got {type(prepared).__name__}")
    ctx = prepared._ctx
    if ctx.mode == "static" and prepared.num_calibration_samples == 0:
        raise CalibrationError("no calibration data reached the prepared model: run samples through it "
                               "(or call prepared.calibrate(loader)) before convert()")
    t0 = time.perf_counter()
    ref = copy.deepcopy(prepared.gm)
    ref = PassManager([ConvertToReference()])(ref).graph_module
    ctx.timings["convert_s"] = time.perf_counter() - t0
    return Artifact.build(ref, ctx.backend, ctx, verify=verify)


def compile(model: nn.Module, example_inputs, backend="x86", *, calibration=None, verify: bool = True,
            progress=None, **options) -> Artifact:
    """Quantize ``model`` for ``backend``. Static mode needs ``calibration`` (an iterable of samples:
    tensors, tuples of positional inputs or dicts of keyword inputs). Other options: see :class:`Options`."""
    opts = Options.parse(options)
    if opts.mode == "static" and calibration is None:
        raise CalibrationError("static quantization needs calibration=<iterable of samples> "
                               "(or use mode='dynamic' / 'weight_only', which need none)")
    prepared = prepare(model, example_inputs, backend, **options)
    t0 = time.perf_counter()
    if calibration is not None:
        prepared.calibrate(calibration, progress=progress)
    prepared._ctx.timings["calibration_s"] = time.perf_counter() - t0
    return convert(prepared, verify=verify)


def explain(model: nn.Module, example_inputs, backend="x86", **options) -> Report:
    """Predict coverage (what will be int8 and what float, and why) before any calibration."""
    _, ctx = _setup(model, example_inputs, backend, Options.parse(options))
    return _report(ctx, predicted=True)
