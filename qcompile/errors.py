"""Error types. Every message says what failed, where (node / module / source line) and what to do."""
from __future__ import annotations


class QCompileError(Exception):
    """Base class of every qcompile error."""


class CaptureError(QCompileError):
    """The model could not be captured as a graph (torch.export failed)."""


class ConfigError(QCompileError, ValueError):
    """A configuration the backend cannot honour, or a malformed option."""


class CalibrationError(QCompileError, ValueError):
    """Calibration data is missing, empty, or holds NaN / Inf."""


class UnsupportedError(QCompileError):
    """An op the backend cannot lower (raised in strict mode or when no float fallback exists)."""


class StrictFallbackError(UnsupportedError):
    """strict=True and some nodes would stay in float."""


class InputError(QCompileError, ValueError):
    """Inputs that do not match what the model was compiled for."""


class ArtifactFileError(QCompileError, ValueError):
    """A file qcompile.load refuses: not a .qc file, truncated or corrupt, from a newer qcompile, or crafted
    to run code. The message names the file, what is wrong and what to do."""


class BackendUnavailableError(QCompileError, ImportError):
    """A backend's runtime is not installed; the message names the package to install."""


class QCompileWarning(UserWarning):
    """Something qcompile handled on the user's behalf and says so (e.g. a model in training mode captured
    in eval mode for post-training quantization)."""


class NumericsError(QCompileError):
    """strict=True and the lowered artifact's output is far from the float model's."""


class QuantizationWarning(QCompileWarning):
    """The compiled artifact is far from the float model (see ``Report.warnings``)."""


def where(node) -> str:
    """Human location of an fx node: name, module path and the user's source line when known."""
    parts = [f"node '{node.name}' ({_target_name(node)})"]
    stack = node.meta.get("nn_module_stack") if hasattr(node, "meta") else None
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            parts.append(f"in module '{path}'")
    trace = node.meta.get("stack_trace") if hasattr(node, "meta") else None
    if trace:
        user = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
        if user:
            parts.append(f"at {user[0]}")
    return " ".join(parts)


def _target_name(node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)
