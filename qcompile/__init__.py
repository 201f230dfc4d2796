"""qcompile: a quantization compiler for PyTorch models.

    art = qcompile.compile(model, example_inputs, backend="x86", calibration=loader)
    art(x); print(art.report); art.save("model.qc"); qcompile.load("model.qc")
"""
from .api import compile, convert, explain, prepare  # noqa: A004 - the product's verb
from .artifact import Artifact
from .loading import load
from .evaluate import Evaluation, evaluate
from .qat import prepare_qat
from .config import ModuleConfig, QConfig
from .errors import (ArtifactFileError, BackendUnavailableError, CalibrationError, CaptureError, ConfigError, InputError,
                     NumericsError, QCompileError, QCompileWarning, QuantizationWarning, StrictFallbackError,
                     UnsupportedError)
from .report import Report
from .budget import AccuracyBudget
from .autotune import autotune
from .specs import ActivationSpec, QuantSpec, WeightSpec
from .passes.annotate import keep_float

__version__ = "0.1.0"
__all__ = [
    "compile", "evaluate", "Evaluation", "prepare", "prepare_qat", "convert", "explain", "load", "Artifact", "Report", "QConfig", "ModuleConfig",
    "WeightSpec", "ActivationSpec", "QuantSpec", "QCompileError", "CaptureError", "ConfigError",
    "CalibrationError", "UnsupportedError", "StrictFallbackError", "InputError", "BackendUnavailableError",
    "ArtifactFileError", "QCompileWarning", "NumericsError", "QuantizationWarning",
    "AccuracyBudget", "autotune", "keep_float",
]
