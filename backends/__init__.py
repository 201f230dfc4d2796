"""Backend registry: an explicit lazy table (name -> "module:attr") plus the ``qcompile.backends``
entry-point group for third-party backends. Nothing registers itself by import side effect."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from qcompile.errors import BackendUnavailableError, ConfigError

from .base import Backend, Lowered, LoweringRule, check_backend


def __getattr__(name: str):
    """``TableBackend`` / ``ModeTable`` load on first use: table.py imports the passes, which import this
    package's support vocabulary."""
    if name in ("TableBackend", "ModeTable"):
        from . import table
        return getattr(table, name)
    raise AttributeError(f"module 'qcompile.backends' has no attribute {name!r}")


_BUILTIN = {
    "x86": "qcompile.backends.x86.backend:X86Backend",
    "onnx": "qcompile.backends.onnx.backend:OnnxBackend",
    "executorch": "qcompile.backends.executorch.backend:ExecuTorchBackend",
}
_ALIASES = {"mobile": "executorch", "xnnpack": "executorch", "cpu": "x86", "fbgemm": "x86"}
_EXTRA: dict[str, object] = {}


def register_backend(name: str, factory) -> None:
    """Register a backend class (or a "module:attr" string, checked when first used) under ``name``.
    A class lacking a contract method (see ``backends/base.py``) raises ConfigError naming it."""
    if not isinstance(factory, str):
        check_backend(factory, name)
    _EXTRA[name] = factory


def available_backends() -> list[str]:
    eps = [ep.name for ep in entry_points(group="qcompile.backends")]
    return sorted(set(_BUILTIN) | set(_EXTRA) | set(eps))


def _load(ref):
    if isinstance(ref, str):
        mod, attr = ref.split(":")
        return getattr(importlib.import_module(mod), attr)
    return ref


def get_backend(name_or_backend, **options):
    """Instantiate a backend by name (or pass a backend object through)."""
    if not isinstance(name_or_backend, str):
        if options:
            raise ConfigError("backend_options apply to a backend given by name; configure a backend object "
                              "when you create it")
        check_backend(name_or_backend, getattr(name_or_backend, "name", type(name_or_backend).__name__))
        return name_or_backend
    name = _ALIASES.get(name_or_backend, name_or_backend)
    ref = _EXTRA.get(name) or _BUILTIN.get(name)
    if ref is None:
        for ep in entry_points(group="qcompile.backends"):
            if ep.name == name:
                ref = ep.value
    if ref is None:
        raise ConfigError(f"unknown backend {name_or_backend!r}; available: {', '.join(available_backends())}")
    try:
        cls = _load(ref)
    except ImportError as e:
        raise BackendUnavailableError(f"backend {name!r} could not be imported: {e}") from e
    check_backend(cls, name)
    backend = cls(**options)
    ok, why = backend.is_available()
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is not available: {why}")
    return backend


__all__ = ["Backend", "Lowered", "LoweringRule", "ModeTable", "TableBackend", "available_backends", "get_backend",
           "register_backend"]
