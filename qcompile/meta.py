"""The one owner of every ``node.meta`` / ``gm.meta`` key qcompile writes.

Passes hand data to later passes through fx metadata. Each key is declared here once, as a :class:`Key`
with the holder it lives on (a node or the graph module), the type of its value, the pass that writes it
and the passes that read it; code calls ``KEY.get(holder)`` / ``KEY.set(holder, value)`` and never spells
the string. ``grep -n "Key(" qcompile/meta.py`` is the list of every hand-over between passes.

    >>> from qcompile import meta
    >>> meta.OBSERVED.name
    'qcompile_observed'

The quantization annotation and fusion group keys are declared here too; their typed accessors stay in
:mod:`qcompile.annotation` (``get_annotation`` / ``set_group`` ...), the one module that writes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_MISSING = object()
KEYS: dict[str, "Key"] = {}


@dataclass(frozen=True)
class Key(Generic[T]):
    """One metadata key: ``name`` (the string in ``.meta``), ``on`` ("node" or "graph"), the value's
    ``type`` (documentation and a check in :meth:`set`), who writes and who reads it."""

    name: str
    on: str
    type: Any
    writer: str
    readers: str = ""

    def __post_init__(self):
        if self.on not in ("node", "graph"):
            raise ValueError(f"meta key {self.name}: on must be 'node' or 'graph', got {self.on!r}")
        if KEYS.setdefault(self.name, self) is not self:
            raise ValueError(f"meta key {self.name} declared twice")

    def get(self, holder, default=None) -> T:
        return holder.meta.get(self.name, default)

    def set(self, holder, value: T) -> None:
        if self.type is not Any and not isinstance(value, self.type):
            raise TypeError(f"meta key {self.name} holds {self.type}, got {type(value).__name__}")
        holder.meta[self.name] = value

    def setdefault(self, holder, default: T) -> T:
        return holder.meta.setdefault(self.name, default)

    def pop(self, holder, default=_MISSING) -> T:
        return holder.meta.pop(self.name) if default is _MISSING else holder.meta.pop(self.name, default)

    def has(self, holder) -> bool:
        return self.name in holder.meta


# -- capture ------------------------------------------------------------------------------------
INPUTS = Key("qcompile_inputs", "graph", Any, "passes.capture (CapturedInputs: the example inputs)",
             "pipeline / api / qat")
PROPERTIES = Key("qcompile_properties", "graph", frozenset, "passes.infra.establish / PassManager",
                 "passes.infra (requires / ensures checks)")
TRAIN = Key("qcompile_train", "graph", bool, "passes.capture (captured in training mode: QAT)",
            "passes.normalize (no constant folding: the parameters are still trained)")

# -- annotation (accessors in qcompile.annotation) ------------------------------------------------
ANNOTATION = Key("qcompile_annotation", "node", Any, "qcompile.annotation.set_annotation", "every pass")
GROUP = Key("qcompile_group", "node", Any, "qcompile.annotation.set_group (passes.fuse)", "annotate, convert")
REJECTIONS = Key("qcompile_rejections", "node", list, "passes.fuse (rule: reason for each rejected pattern), "
                 "passes.decompose_sdpa (why an attention stays fused)",
                 "passes.annotate (the float reason)")
RNN_WEIGHT_SPEC = Key("qcompile_rnn_weight_spec", "node", Any, "passes.dynamic.AnnotateRecurrent (QuantSpec)",
                      "passes.convert")

# -- observers, fake-quant, convert ----------------------------------------------------------------
OBSERVED = Key("qcompile_observed", "graph", dict, "passes.insert_observers (observer -> value names)",
               "convert, calibration_stats, equalize, bias_correction, weight_only, insert_fake_quant")
EDGE_OBSERVER = Key("qcompile_edge_observer", "node", bool, "passes.insert_observers (observer of one edge)")
WEIGHT_FAKE_QUANT = Key("qcompile_weight_fake_quant", "graph", dict,
                        "passes.insert_fake_quant (fake-quant module -> consumer node)", "insert_fake_quant")
FIXED_FAKE_QUANT = Key("qcompile_fixed_fake_quant", "graph", list,
                       "passes.insert_fake_quant (fixed-range fake-quant modules)", "insert_fake_quant, qat")
QPARAMS = Key("qcompile_qparams", "node", Any, "passes.convert (QParams of a quantize / dequantize node)")
WEIGHT_QPARAMS = Key("qcompile_weight_qparams", "node", Any,
                     "insert_fake_quant, weight_only (GPTQ), adaround (QParams of a weight constant)",
                     "convert, bias_correction")

# -- QAT conv-BN and dropout --------------------------------------------------------------------------
QAT_BN = Key("qcompile_qat_bn", "node", Any, "passes.qat_conv_bn (BnInfo after collapse, BnNodes after expand)",
             "qat_conv_bn")
BN_COUNTERS = Key("qcompile_bn_counters", "graph", list, "passes.qat_conv_bn.StripBnCounters (buffer targets)",
                  "qat")
QAT_DROPOUTS = Key("qcompile_qat_dropouts", "graph", list, "passes.qat_conv_bn.DetachDropout (removed edges)",
                   "qat_conv_bn.ReattachDropout")

# -- algorithms' reports ------------------------------------------------------------------------------
EQUALIZATION = Key("qcompile_equalization", "graph", dict, "passes.equalize (pairs / skipped)", "algorithms")
BIAS_CORRECTION = Key("qcompile_bias_correction", "graph", dict, "passes.bias_correction (layer -> |shift|)")
WEIGHT_ROUNDING = Key("qcompile_weight_rounding", "graph", dict, "passes.weight_only, passes.adaround "
                      "(layer -> rounding stats)", "api (report.weight_rounding)")
ALGORITHMS = Key("qcompile_algorithms", "graph", dict, "qcompile.algorithms (name -> summary)",
                 "api (report.algorithms)")
EXACT_INPUT = Key("qcompile_exact_input", "graph", dict, "passes.input_lattice (lattice, nodes / skipped)",
                  "passes.input_lattice.MarkExactInput, algorithms")
SMOOTHQUANT = Key("qcompile_smoothquant", "graph", dict, "passes.smoothquant (groups / skipped)", "algorithms")
SMOOTHQUANT_SCALES = Key("qcompile_smoothquant_scales", "graph", dict,
                         "passes.smoothquant (LayerNorm node -> s: its value is x / s)", "sensitivity (layer SQNR)")

# -- backends: keys inside node.meta["custom"] (torch.export carries "custom" through re-export) --------
ONNX_REF = "qcompile_ref"        # backends.onnx.prepare: the reference node an exported node came from
EXECUTORCH_REF = "qcompile_node"  # backends.executorch.lower: the reference node an edge node came from


def custom_get(node, key: str, default=None):
    """``node.meta["custom"][key]`` (the dict torch.export keeps on re-export), or ``default``."""
    return ((getattr(node, "meta", None) or {}).get("custom") or {}).get(key, default)


def custom_set(node, key: str, value) -> None:
    node.meta["custom"] = {**(node.meta.get("custom") or {}), key: value}
