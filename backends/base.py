"""The backend contract: every method the pipeline (``qcompile/pipeline.py``) calls, in one abstract class.

A backend turns the quantize / dequantize reference graph into something a runtime executes. The pipeline
calls, in this order::

    is_available()                                   -> (ok, what is missing)      (at get_backend)
    capabilities(mode) / default_config(mode)        validate and complete the user's config
    prepare_passes(config, mode)                     passes up to annotation (the backend decides)
    lower(reference, example_inputs, mode)           -> Lowered
    run(lowered, args, kwargs)                       what ``artifact(x)`` does
    runtime_name()                                   shown in the report
    verify_runtime(artifact, mode)                   what the real runtime did (merged into report.verify)
    save(artifact, path)                             the backend's own file formats (``file_extensions``)

Options are one frozen dataclass (``Options``), parsed once here: an unknown option raises a ConfigError
listing the valid ones. ``mode`` is one of "static", "dynamic", "weight_only", "qat".
"""
from __future__ import annotations

import abc
import copy
import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import fx

from qcompile.errors import ConfigError

MODES = ("static", "dynamic", "weight_only", "qat")
# the methods register_backend / get_backend check, and which of them must take ``mode``
REQUIRED = ("is_available", "capabilities", "default_config", "prepare_passes", "lower", "run", "runtime_name",
            "verify_runtime", "save")
TAKES_MODE = ("capabilities", "default_config", "prepare_passes", "lower", "verify_runtime")
ATTRIBUTES = ("name", "Options", "file_extensions", "user_rules")  # data the pipeline reads


@dataclass(kw_only=True)
class Lowered:
    """What ``Backend.lower`` returns; backends subclass it with their runtime objects (an ONNX Runtime
    session, an ExecuTorch program...). The pipeline and the report read only these fields:

    kernels    reference node name -> the kernel the runtime runs it with ("quantized::conv2d", ...):
               the report's int8 rows
    fallbacks  reference node name -> why it runs in float although it was annotated int8 (the report
               marks it "float: fell back on the runtime" with that reason)
    taps       reference quantize node name -> lowered node name computing the same value (layer-by-layer
               agreement; may stay empty)
    gm         an fx view of the stored tensors (parameters / buffers) for the report's storage rows; None
               when the backend stores nothing an fx module can show
    storage    buffer name of ``gm`` -> (reference layer, role, number of weights): tags for storage rows
    """

    kernels: dict = field(default_factory=dict)
    fallbacks: dict = field(default_factory=dict)
    taps: dict = field(default_factory=dict)
    gm: fx.GraphModule | None = None
    storage: dict = field(default_factory=dict)


@dataclass(frozen=True)
class NoOptions:
    """A backend without options."""


@dataclass(frozen=True)
class LoweringRule:
    """A lowering rule a user adds with ``backend.with_rules([...])``.

    name     the pattern name (a support-table row name; the lowering of that pattern is replaced)
    lower    the backend's rule function, a rewrite of the one rewrite engine (qcompile.passes.rewrite).
             x86: ``fn(match)`` (``match.ctx`` the Lowerer, ``match.nodes`` the group, ``match.user`` its
             output quantize node) returning the emitted kernel (``Emitted``) or a reason string when it
             declines (the nodes then stay float with that reason); a TableBackend subclass documents its own.
    support  an ``OpSupport`` row claiming a new pattern at annotation (None: the row already exists)
    """

    name: str
    lower: Callable
    support: Any = None


class Backend(abc.ABC):
    """Subclass and implement the abstract methods (or use :class:`TableBackend`, which derives the prepare
    pipeline from a support table). ``Options`` is the frozen dataclass of backend options."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    file_extensions: ClassVar[tuple] = ()  # own file formats written by save()
    rule_help: ClassVar[str] = ""  # the signature of this backend's lowering rules ("" : no with_rules)
    user_rules: tuple = ()  # LoweringRules added with with_rules

    def __init__(self, **options):
        self.options = parse_options(self.name, self.Options, options)
        self.check_options()

    def check_options(self) -> None:
        """Raise ConfigError for option values the dataclass accepts but the backend cannot use."""

    @abc.abstractmethod
    def is_available(self) -> tuple[bool, str]:
        """(True, "") or (False, what is missing and how to install it)."""

    @abc.abstractmethod
    def capabilities(self, mode: str):
        """The ``Capabilities`` the user's config is validated against in ``mode``."""

    @abc.abstractmethod
    def default_config(self, mode: str):
        """The ``QConfig`` this backend recommends for ``mode`` (fills what the user left unset)."""

    @abc.abstractmethod
    def prepare_passes(self, config, mode: str) -> list:
        """The passes from the captured graph to an annotated one (Normalize ... Annotate)."""

    @abc.abstractmethod
    def lower(self, reference: fx.GraphModule, example_inputs, mode: str) -> Lowered:
        """Lower the reference graph. ``example_inputs`` is a ``CapturedInputs`` (``.args``, ``.kwargs``)."""

    @abc.abstractmethod
    def run(self, lowered: Lowered, args: tuple, kwargs: dict):
        """Run the lowered model on the runtime; return outputs shaped like the model's."""

    @abc.abstractmethod
    def runtime_name(self) -> str:
        """The runtime and version, e.g. "onnxruntime-CPU 1.22"."""

    def verify_runtime(self, artifact, mode: str) -> dict:
        """Extra verification read back from the runtime (merged into ``report.verify``)."""
        return {}

    def save(self, artifact, path: str) -> None:
        """Write ``artifact`` in one of ``file_extensions`` (Artifact.save renames the file atomically)."""
        raise ConfigError(f"backend {self.name!r} writes no file format of its own; save as '.qc'")

    def with_rules(self, rules) -> "Backend":
        """A copy of this backend that also lowers the given :class:`LoweringRule` s (later rules win)."""
        if not self.rule_help:
            raise ConfigError(f"the {self.name} backend takes no lowering rules (with_rules); see docs/extending.md "
                              f"for the backends that do, or write a backend")
        rules = tuple(rules)
        for r in rules:
            if not isinstance(r, LoweringRule):
                raise ConfigError(f"{self.name} backend: with_rules takes qcompile.backends.LoweringRule values, "
                                  f"got {type(r).__name__}")
        new = copy.copy(self)
        new.user_rules = self.user_rules + rules
        return new

    def lowering_rules(self, builtin):
        """``builtin`` (a :class:`~qcompile.passes.rewrite.RuleSet`) with the user's rules on top: a user rule
        replaces the built-in rule of the same name, or lowers the new pattern its support row claims."""
        from qcompile.passes.rewrite import Rule, RuleSet
        rules = {r.name: r for r in builtin}
        for u in self.user_rules:
            pattern = (tuple(u.support.ops) if u.support is not None
                       else rules[u.name].pattern if u.name in rules else (u.name,))
            rules[u.name] = Rule(u.name, pattern, rewrite=u.lower)
        return RuleSet(rules.values())


def parse_options(name: str, cls: type, options: dict):
    """The frozen options dataclass from keyword options; a ConfigError lists the valid ones."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"{name} backend: unknown option(s) {unknown}; options are {valid}")
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError(f"{name} backend: {e}; options are {valid}") from e


def check_backend(cls_or_obj, name: str) -> None:
    """Raise ConfigError naming every contract method ``cls_or_obj`` lacks (or that does not take ``mode``)."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    missing = [m for m in REQUIRED if not callable(getattr(cls, m, None))]
    missing += sorted(getattr(cls, "__abstractmethods__", ()))
    missing += [a for a in ATTRIBUTES if not hasattr(cls, a)]
    if missing:
        raise ConfigError(f"backend {name!r} ({cls.__module__}.{cls.__qualname__}) does not implement "
                          f"{sorted(set(missing))}: subclass qcompile.backends.Backend (docs/extending.md)")
    no_mode = [m for m in TAKES_MODE if "mode" not in inspect.signature(getattr(cls, m)).parameters]
    if no_mode:
        raise ConfigError(f"backend {name!r}: {no_mode} must take a 'mode' argument (docs/extending.md)")
    opts = getattr(cls, "Options", None)
    if not (dataclasses.is_dataclass(opts) and opts.__dataclass_params__.frozen):
        raise ConfigError(f"backend {name!r}: Options must be a frozen dataclass (saved with the artifact)")
