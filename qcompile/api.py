"""Public entry points: compile / prepare / convert / explain. Argument checks, then one call into
:mod:`qcompile.pipeline` (which owns the orchestration and the report)."""
from __future__ import annotations

from torch import nn

from . import pipeline
from .artifact import Artifact
from .errors import ConfigError
from .pipeline import Options, PreparedModel
from .qat import QATModel, convert_qat
from .report import Report
from .validate import check_call_args


def prepare(model: nn.Module, example_inputs, backend="x86", **options) -> PreparedModel:
    """Capture, run the backend's prepare passes and insert observers. The user's model is not touched.

    Options: config, weights, activations, exclude, mode, strict, allow_float, example_kwargs,
    backend_options, quantize_outputs, passes (see :class:`qcompile.pipeline.Options`)."""
    opts = Options.parse(options)
    check_call_args(backend, None, True, None)
    return pipeline.prepare(model, example_inputs, backend, opts)


def convert(prepared: PreparedModel, verify: bool = True, verify_data=None) -> Artifact:
    """Observed (or QAT-trained) model -> reference graph -> backend artifact, with the coverage report.
    ``verify_data``: held-out samples (not calibrated on) the report verifies on: SQNR and parity as a
    distribution, per-layer SQNR, activation histograms and calibration health (see docs/evaluate.md)."""
    if isinstance(prepared, QATModel):
        return convert_qat(prepared, verify=verify)
    if not isinstance(prepared, PreparedModel):
        raise ConfigError(f"convert() takes the model returned by qcompile.prepare() or qcompile.prepare_qat(), "
                          f"got {type(prepared).__name__}")
    return pipeline.convert_prepared(prepared, verify=verify, verify_data=verify_data)


def compile(model: nn.Module, example_inputs, backend="x86", *, calibration=None, verify: bool = True,
            progress=None, verify_data=None, accuracy=None, **options) -> Artifact:
    """Quantize ``model`` for ``backend``. Static mode needs ``calibration`` (an iterable of samples:
    tensors, tuples of positional inputs or dicts of keyword inputs). ``verify_data``: held-out samples the
    report verifies on (default: the last 1/8, at most 4, of a calibration list of >= 8 samples, which
    are then not calibrated on). ``accuracy=qcompile.AccuracyBudget(...)``: move layers back to higher precision until it
    holds. ``passes={"after_capture" | "after_annotate" | "before_lower": [passes]}``: your own passes
    (docs/extending.md). Other options: see :class:`qcompile.pipeline.Options`."""
    opts = Options.parse(options)
    check_call_args(backend, calibration, verify, progress)
    if accuracy is not None:
        from .budget import search
        calibration = list(calibration) if calibration is not None else None
        return search(model, example_inputs, backend, calibration, accuracy, **options)
    return pipeline.compile_model(model, example_inputs, backend, opts, calibration, verify, progress, verify_data)


def explain(model: nn.Module, example_inputs, backend="x86", **options) -> Report:
    """Predict coverage (what will be int8 and what float, and why) before any calibration."""
    opts = Options.parse(options)
    check_call_args(backend, None, True, None)
    _, ctx = pipeline.setup(model, example_inputs, backend, opts, check_strict=False)
    return pipeline.predicted_report(ctx)
