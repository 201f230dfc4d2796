"""Emit the quantize/dequantize reference graph as a standard ONNX QDQ model with ``torch.onnx.export``.

1. ``prepare.prepare``: a copy of the reference graph, stamped with reference node names, with the layouts
   ORT runs best and qcompile's own ops (``custom_ops.py``) for the dynamic / weight-only modes;
2. ``torch.export`` of that copy (symbolic batch when the example batch is > 1), then
   ``torch.onnx.export(..., dynamo=True, custom_translation_table=custom_ops.TRANSLATIONS)``: onnxscript's
   torch_lib translates every ATen op and the ``quantized_decomposed`` Q/DQ ops (QuantizeLinear /
   DequantizeLinear with int8 weight and int32 bias initializers); its optimizer folds constants and
   shares identical scales / zero points;
3. ``naming.py`` (onnx-ir passes): module-path node names (``layer1.0.conv1/conv2d_1``, ``fc.weight:dq``),
   the batch dimension named ``batch``, and the bookkeeping the report reads (``Emitted``).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import onnx
import onnx.version_converter
import torch
from torch import fx

from qcompile.errors import ConfigError, UnsupportedError, where

from . import custom_ops
from .emitted import Emitted, QInfo, flat_inputs  # noqa: F401  (Emitted, QInfo: re-exported)
from .naming import finish
from .prepare import prepare

MIN_OPSET, MAX_OPSET = 13, 23  # per-channel QDQ needs 13; torch.onnx writes 18+ and converts down on request


@dataclass(frozen=True)
class EmitOptions:
    opset: int | None = None       # None: torch.onnx's default
    dynamic_batch: bool = True     # symbolic batch dimension on inputs and outputs
    accuracy_level: int | None = None  # MatMulNBits accuracy_level (None: 0 for <= 4-bit blocks, 4 for 8-bit)


def _batch(flat: list) -> int | None:
    return next((int(a.shape[0]) for a in flat if isinstance(a, torch.Tensor) and a.dim() > 0), None)


def emit(ref: fx.GraphModule, args: tuple, kwargs: dict, opts: EmitOptions, user_table: dict | None = None
         ) -> Emitted:
    if opts.opset is not None and not MIN_OPSET <= opts.opset <= MAX_OPSET:
        raise ConfigError(f"onnx backend: opset={opts.opset} is outside the supported range "
                          f"[{MIN_OPSET}, {MAX_OPSET}] (per-channel QDQ needs >= {MIN_OPSET})")
    flat = flat_inputs(args, kwargs)
    batch = _batch(flat)
    # torch.export specializes a batch of 1 (a graph traced at batch 1 may bake it in without any shape
    # showing it: MiniLM ran at batch 3 without error, 17 dB from float); capture's _export traces such an
    # example as batch 2 (its rows twice), so the batch is symbolic there too
    dynamic = opts.dynamic_batch and batch is not None
    prep = prepare(ref, opts.accuracy_level)
    ep = _export(prep.gm, args, kwargs, dynamic)
    program = _to_onnx(ep, ref, opts, user_table)
    out = finish(program, ref, prep, flat)
    if dynamic and not out.dynamic_batch:
        out.notes.append("dynamic batch disabled: torch.export specialized the batch dimension (the graph "
                         "bakes in the example batch size)")
    try:
        onnx.checker.check_model(out.model, full_check=True)
    except Exception as e:  # noqa: BLE001 - never hand out an invalid model
        raise UnsupportedError(f"onnx backend: the emitted model failed onnx.checker: {e}") from e
    return out


def _export(gm: fx.GraphModule, args: tuple, kwargs: dict, dynamic: bool):
    from qcompile.passes.capture import CapturedInputs
    from qcompile.passes.capture import _export as export_program
    try:
        return export_program(gm, CapturedInputs(tuple(args), dict(kwargs or {})), dynamic)
    except Exception as e:  # noqa: BLE001 - the reference graph ran at calibration: this is our bug or torch's
        raise UnsupportedError(f"onnx backend: torch.export could not re-capture the reference graph for ONNX "
                               f"export: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e


def _to_onnx(ep, ref: fx.GraphModule, opts: EmitOptions, user_table: dict | None = None):
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # "torchvision is not installed"
    table = {**custom_ops.TRANSLATIONS, **(user_table or {})}
    try:
        program = torch.onnx.export(ep, dynamo=True, custom_translation_table=table, opset_version=opts.opset,
                                    optimize=True, verbose=False, report=False)
    except Exception as e:  # noqa: BLE001 - name the node the exporter could not translate
        msg = str(e) + "".join(f"\n{c}" for c in _causes(e))
        culprit = _culprit(msg, ref)
        raise UnsupportedError(
            f"onnx backend: torch.onnx could not translate {where(culprit) if culprit else 'the graph'}: "
            f"{_first(msg)}\n  fix: give the op an ONNX translation with backend_options="
            f"{{'custom_translation_table': {{<op overload>: <onnxscript function>}}}} (docs/backends/onnx.md), "
            f"rewrite it with ops torch.onnx exports, or use backend='x86'") from e
    got = program.model.opset_imports.get("")
    if opts.opset is not None and got != opts.opset:
        raise ConfigError(f"onnx backend: opset={opts.opset} is too old for this graph: the ONNX version converter "
                          f"could not lower it from opset {got} ({_conversion_error(program.model, opts.opset)}). "
                          f"Leave opset unset (torch.onnx's default, {got}) or raise it.")
    return program


def _conversion_error(model, opset: int) -> str:
    import onnx_ir as ir
    try:
        onnx.version_converter.convert_version(ir.serde.serialize_model(model), opset)
    except Exception as e:  # noqa: BLE001 - the converter's reason is the message
        return str(e).strip().splitlines()[-1].split(": ", 1)[-1][:200]
    return "unknown reason"


def _causes(e: BaseException):
    while e.__cause__ is not None:
        e = e.__cause__
        yield e


def _first(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return next((ln for ln in lines if "Error" in ln or "No " in ln), lines[0] if lines else "")[:300]


def _culprit(msg: str, ref: fx.GraphModule):
    """The reference node an exporter error names (``ns::op`` or ``ns.op``), if any."""
    for m in re.finditer(r"(\w+)(?:::|\.)(\w+)", msg):
        key = f"{m.group(1)}.{m.group(2)}"
        for node in ref.graph.nodes:
            if node.op == "call_function" and (str(node.target) + ".").startswith(key + "."):
                return node
    return None
