"""User configuration: global default, per module type, per module name / regex, exclusions.

Validated against the backend's capabilities: an option the backend cannot honour is a ConfigError.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from torch import fx

from .errors import ConfigError
from .ir import module_path, module_type
from .specs import ActivationSpec, WeightSpec

EXCLUDE = None  # value of a per-type / per-name entry that keeps the module in float


@dataclass(frozen=True)
class ModuleConfig:
    weights: WeightSpec | None = None
    activations: ActivationSpec | None = None


@dataclass(frozen=True)
class QConfig:
    """weights / activations: global defaults (None: the backend's default).
    module_types: {nn.Conv2d or "Conv2d": ModuleConfig | None(=exclude)}
    module_names: {"layer4" or regex "layer4\\..*": ModuleConfig | None(=exclude)}
    exclude: module names / regexes / types kept in float.
    quantize_outputs: quantize the values the model returns. None: the backend's default -- False on x86
      and ONNX (the layer producing an output takes int8 inputs and weights but writes float, so outputs
      are not rounded to 8 bits), True on ExecuTorch (XNNPACK has no int8-in / float-out kernel: a float
      output layer would run entirely in fp32; ExecuTorch's own XNNPACKQuantizer flow quantizes it too)."""

    weights: WeightSpec | None = None
    activations: ActivationSpec | None = None
    module_types: dict = field(default_factory=dict)
    module_names: dict = field(default_factory=dict)
    exclude: tuple = ()
    quantize_outputs: bool | None = None

    def with_defaults(self, weights: WeightSpec, activations: ActivationSpec,
                      quantize_outputs: bool | None = None) -> "QConfig":
        qo = self.quantize_outputs if self.quantize_outputs is not None else bool(quantize_outputs)
        return QConfig(self.weights or weights, self.activations or activations,
                       dict(self.module_types), dict(self.module_names), tuple(self.exclude), qo)

    def all_specs(self):
        yield "global", self.weights, self.activations
        for where, table in (("module_types", self.module_types), ("module_names", self.module_names)):
            for k, mc in table.items():
                if mc is not None:
                    yield f"{where}[{_key_name(k)}]", mc.weights, mc.activations

    def describe(self) -> dict:
        return {
            "weights": repr(self.weights), "activations": repr(self.activations),
            "module_types": {_key_name(k): repr(v) if v else "float (excluded)" for k, v in self.module_types.items()},
            "module_names": {k: repr(v) if v else "float (excluded)" for k, v in self.module_names.items()},
            "exclude": [_key_name(e) for e in self.exclude], "quantize_outputs": self.quantize_outputs,
        }


def _key_name(k) -> str:
    return k if isinstance(k, str) else f"{k.__module__}.{k.__qualname__}"


def _name_matches(pattern: str, path: str) -> bool:
    if not path:
        return False
    if path == pattern or path.startswith(pattern + "."):
        return True
    try:
        return re.fullmatch(pattern, path) is not None
    except re.error:
        return False


def _type_matches(key, type_str: str) -> bool:
    if not type_str:
        return False
    if isinstance(key, str):
        return type_str == key or type_str.rsplit(".", 1)[-1] == key
    return type_str == f"{key.__module__}.{key.__qualname__}"


def _stack_entries(node: fx.Node):
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())  # outermost first: (path, type)


def resolve(cfg: QConfig, node: fx.Node) -> ModuleConfig | None:
    """The effective config of a node (innermost module wins), or None when it is excluded."""
    entries = _stack_entries(node)
    for path, typ in entries:
        for ex in cfg.exclude:
            if (isinstance(ex, str) and _name_matches(ex, path)) or (not isinstance(ex, str) and _type_matches(ex, typ)):
                return EXCLUDE
    chosen = ModuleConfig(cfg.weights, cfg.activations)
    for path, typ in entries:  # outer to inner: inner overrides
        for key, mc in cfg.module_types.items():
            if _type_matches(key, typ):
                if mc is None:
                    return EXCLUDE
                chosen = _merge(chosen, mc)
        for key, mc in cfg.module_names.items():
            if _name_matches(key, path):
                if mc is None:
                    return EXCLUDE
                chosen = _merge(chosen, mc)
    return chosen


def _merge(base: ModuleConfig, over: ModuleConfig) -> ModuleConfig:
    return ModuleConfig(over.weights or base.weights, over.activations or base.activations)


def validate(cfg: QConfig, caps, backend_name: str, mode: str) -> None:
    """Raise ConfigError for any option the backend cannot honour."""
    if mode not in caps.modes:
        raise ConfigError(f"backend {backend_name!r} does not support mode={mode!r}; supported: {list(caps.modes)}")
    for where, w, a in cfg.all_specs():
        if w is not None:
            _check(w.bits in caps.weight_bits, backend_name, where, f"weights bits={w.bits}", caps.weight_bits)
            _check(w.symmetric in caps.weight_symmetric, backend_name, where,
                   f"weights symmetric={w.symmetric}", caps.weight_symmetric)
            _check(w.granularity in caps.weight_granularities, backend_name, where,
                   f"weights granularity={w.granularity!r}", caps.weight_granularities)
        if a is not None and mode == "static":
            _check(a.bits in caps.act_bits, backend_name, where, f"activations bits={a.bits}", caps.act_bits)
            _check(a.symmetric in caps.act_symmetric, backend_name, where,
                   f"activations symmetric={a.symmetric}", caps.act_symmetric)
            _check(a.granularity in caps.act_granularities, backend_name, where,
                   f"activations granularity={a.granularity!r}", caps.act_granularities)


def _check(ok: bool, backend: str, where: str, what: str, allowed) -> None:
    if not ok:
        raise ConfigError(f"backend {backend!r} cannot honour {what} (in {where}); it supports {list(allowed)}. "
                          f"Change the option or pick another backend.")


def make_config(config: QConfig | None, weights, activations, exclude, quantize_outputs=None) -> QConfig:
    """Merge the keyword shortcuts of compile()/prepare() into one QConfig."""
    cfg = config or QConfig()
    if not isinstance(cfg, QConfig):
        raise ConfigError(f"config must be a qcompile.QConfig, got {type(cfg).__name__}")
    if weights is not None and not isinstance(weights, WeightSpec):
        raise ConfigError(f"weights= must be a qcompile.WeightSpec, got {type(weights).__name__}")
    if activations is not None and not isinstance(activations, ActivationSpec):
        raise ConfigError(f"activations= must be a qcompile.ActivationSpec, got {type(activations).__name__}")
    qo = cfg.quantize_outputs if quantize_outputs is None else bool(quantize_outputs)
    return QConfig(weights or cfg.weights, activations or cfg.activations, dict(cfg.module_types),
                   dict(cfg.module_names), tuple(cfg.exclude) + tuple(exclude or ()), qo)
