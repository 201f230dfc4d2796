"""Annotation driven by the backend's support table.

For each fusion group the backend claimed, attach frozen specs (activation inputs, weight, output);
every other node is marked float with the reason. Observer insertion and convert only read this.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import fx

from qcompile import annotation as A
from qcompile.config import QConfig, resolve
from qcompile.errors import ConfigError
from qcompile.ir import is_depthwise_conv
from qcompile.specs import SharedSpec, WeightSpec
from qcompile.support import ANCHOR, FIXED, PROPAGATE, SHARED, OpSupport

from .fuse import REJECTIONS
from .infra import Pass, PassResult
from qcompile.ops import op_kind


@dataclass(frozen=True)
class SpecMaker:
    """Backend hooks turning user specs into QuantSpecs: act(ActivationSpec), weight(WeightSpec, row, node)."""

    act: Callable
    weight: Callable


def _is_float_tensor(arg) -> bool:
    if not isinstance(arg, fx.Node):
        return False
    val = arg.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


_GEMMS = frozenset({"conv1d", "conv2d", "conv_transpose2d", "linear", "matmul"})


def _reads_model_input(x: fx.Node) -> bool:
    """Whether a path of non-GEMM ops (pad, permute, normalisation...) leads from a graph input to ``x``."""
    seen, todo = set(), [x]
    while todo:
        n = todo.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        if n.op == "call_function" and op_kind(n) not in _GEMMS:
            todo.extend(n.all_input_nodes)
    return False


def sensitive_conv(gm: fx.GraphModule, anchor: fx.Node) -> str | None:
    """Why a conv is one whose weights ``WeightSpec.sensitive_bits`` keeps wider, or None."""
    if op_kind(anchor) not in ("conv1d", "conv2d"):
        return None
    if is_depthwise_conv(gm, anchor):
        return "depthwise conv"
    if isinstance(anchor.args[0], fx.Node) and _reads_model_input(anchor.args[0]):
        return "first layer (reads the model input)"
    return None


def _sensitive_weights(gm, anchor, mc, config) -> tuple[WeightSpec | None, str | None]:
    """(the weight spec of ``anchor``, the report's note when ``sensitive_bits`` widened it)."""
    w = mc.weights
    if w is None or w is not config.weights or w.dtype != "int" or w.sensitive_bits is None or \
            w.bits >= w.sensitive_bits:
        return w, None  # a per-module config, or nothing to widen
    why = sensitive_conv(gm, anchor)
    if why is None:
        return w, None
    gran = "per_channel" if w.granularity == "per_group" else w.granularity
    wide = replace(w, bits=w.sensitive_bits, granularity=gran, group_size=None,
                   observer=None if w.default_observer else w.observer)  # the default for the wider bits
    return wide, (f"{A.WIDER_WEIGHTS} {w.sensitive_bits} bits, not {w.bits}: {why} "
                  f"(WeightSpec(sensitive_bits=None) gives it {w.bits})")


class Annotate(Pass):
    requires, ensures = frozenset({"normalized"}), frozenset({"annotated"})
    def __init__(self, table: list[OpSupport], config: QConfig, specs: SpecMaker, backend_name: str,
                 notes: dict | None = None):
        self.rows = {row.name: row for row in table}
        self.config, self.specs, self.backend, self.notes = config, specs, backend_name, notes or {}

    def call(self, gm: fx.GraphModule) -> PassResult:
        self._gm = gm
        quantized: set[str] = set()  # nodes whose output is int8
        for node in gm.graph.nodes:
            if node.op != "call_function" or A.get_annotation(node) is not None:
                continue
            group = A.get_group(node)
            if group is None:
                A.set_annotation(node, A.Annotation(status=A.FLOAT_UNSUPPORTED, reason=self._why_not(node)))
                continue
            nodes = [n for n in gm.graph.nodes if n.name in group.nodes]
            kept = next((A.get_annotation(n) for n in nodes if A.get_annotation(n) is not None), None)
            if kept is not None:  # a user pass kept a member float (keep_float): the whole group stays float
                self._float(nodes, kept.status, kept.reason)
                continue
            self._annotate_group(nodes, self.rows[group.pattern], quantized)
        return PassResult(gm, True)

    def _why_not(self, node: fx.Node) -> str:
        kind = op_kind(node)
        base = self.notes.get(kind) or f"no int8 kernel for {kind or getattr(node.target, '__name__', node.target)} " \
                                       f"in the {self.backend} backend"
        rejected = node.meta.get(REJECTIONS)
        return base + (f" ({'; '.join(rejected)})" if rejected else "")

    def _float(self, nodes, status, reason):
        for n in nodes:
            A.set_annotation(n, A.Annotation(status=status, reason=reason))

    def _annotate_group(self, nodes, row: OpSupport, quantized: set[str]) -> None:
        anchor, out = nodes[0], nodes[-1]
        mc = resolve(self.config, anchor)
        if mc is None:
            return self._float(nodes, A.FLOAT_EXCLUDED, "excluded by the user's config")
        acts = [anchor.args[i] if i < len(anchor.args) else None for i in row.act_args]
        if not all(_is_float_tensor(a) for a in acts):
            return self._float(nodes, A.FLOAT_UNSUPPORTED,
                               f"{row.name}: the int8 kernel needs float tensor inputs at args {row.act_args}")
        if row.check and (reason := row.check(nodes)):
            return self._float(nodes, A.FLOAT_UNSUPPORTED, f"{row.name}: {reason}")
        if row.kind != ANCHOR and not all(a.name in quantized for a in acts):
            return self._float(nodes, A.FLOAT_UNSUPPORTED,
                               "kept float: an input is float (quantizing it here would add a quantize step and "
                               "its range, e.g. a transformer residual stream, may not suit int8)")
        act_spec = self.specs.act(mc.activations)
        inputs = {i: act_spec for i in row.act_args}
        widened = None
        if row.weight_arg is not None:
            w = anchor.args[row.weight_arg]
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                return self._float(nodes, A.FLOAT_UNSUPPORTED, f"{row.name}: weight is not a constant")
            wspec, widened = _sensitive_weights(self._gm, anchor, mc, self.config)
            inputs[row.weight_arg] = self.specs.weight(wspec, row, anchor)
        output = SharedSpec(acts[0].name) if row.kind == SHARED else \
            {ANCHOR: row.fixed or act_spec, PROPAGATE: act_spec, FIXED: row.fixed}[row.kind]
        status, reason = A.INT8, "; ".join(r for r in (row.note, widened) if r) or None
        if not self.config.quantize_outputs and any(u.op == "output" for u in out.users):
            output, status = None, A.FLOAT_OUTPUT
            reason = "feeds the model output: int8 inputs/weights, float compute and output (quantize_outputs=False)"
        for n in nodes:
            A.set_annotation(n, A.Annotation(
                input_specs=inputs if n is anchor else {}, output_spec=output if n is out else None,
                status=status, reason=reason, group=anchor.name, pattern=row.name))
        if output is not None:
            quantized.add(out.name)


def keep_float(node: fx.Node, reason: str) -> None:
    """Keep ``node`` float, with ``reason`` shown in the report (status "float: excluded by user").

    Call it from a pass of your own (a ``passes=`` hook of ``qcompile.compile`` / ``prepare`` / ``explain``
    / ``prepare_qat``). Before annotation ("after_capture") the backend's annotator keeps the node's whole
    fusion group float; after it ("after_annotate") the group the node belongs to is re-marked float.
    Like ``exclude=``, it is a user decision: ``strict=True`` does not count it as a fallback."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        raise ConfigError(f"keep_float takes an fx call_function node of the graph your pass receives, got "
                          f"{node.op if isinstance(node, fx.Node) else type(node).__name__}")
    if not isinstance(reason, str) or not reason.strip():
        raise ConfigError(f"keep_float({node.name}): give the reason the report shows (a non-empty string)")
    ann = A.Annotation(status=A.FLOAT_EXCLUDED, reason=f"kept float by a user pass: {reason}")
    group, current = A.get_group(node), A.get_annotation(node)
    names = set(group.nodes) if group is not None else {node.name}
    if current is not None and current.group is not None:
        names |= {n.name for n in node.graph.nodes
                  if A.get_annotation(n) is not None and A.get_annotation(n).group == current.group}
    for n in node.graph.nodes:
        if n.name in names:
            A.set_annotation(n, ann)
