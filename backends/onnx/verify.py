"""Parity with the reference graph on ONNX Runtime, layer by layer, and QDQ parameters read back.

Every activation QuantizeLinear output (an integer tensor at a group boundary, named after the module
that produced it) becomes an extra graph output of a probe model; ORT runs it with the same optimization
level, and each one is compared with the reference graph's quantize node on the same inputs: SQNR of
the dequantized values, the share of values within one quantization step, the worst error in steps.
Two pointers to where ORT's arithmetic departs from the reference: the first layer whose SQNR falls
below the threshold, and the largest *local* drop (a layer's SQNR against the worst SQNR of the
quantized values feeding it): rounding differences that only accumulate through a deep network lose a
few dB per layer, a kernel that computes something else (saturation, a wrong axis) loses tens at once.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx

from qcompile.ir import record_values
from qcompile.qparams import sqnr

from .emitted import Emitted
from .lower import feeds
from .runtime import INT_KERNELS, analyze, make_session, producers


def reference_values(ref: fx.GraphModule, flat: list, names) -> dict:
    return record_values(ref, flat, names)


def probe_model(emitted: Emitted) -> onnx.ModelProto:
    """The emitted model with every activation QuantizeLinear output added as a graph output."""
    probe = onnx.ModelProto()
    probe.CopyFrom(emitted.model)
    have = {o.name for o in probe.graph.output}
    for qi in emitted.quantized:
        if qi.value not in have:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(str(qi.dtype).replace("torch.", "")))
            probe.graph.output.append(onnx.helper.make_tensor_value_info(qi.value, elem, None))
    return probe


def layer_parity(ref: fx.GraphModule, emitted: Emitted, flat: list, threshold_db: float,
                 threads: int | None = None) -> dict:
    """Per-layer comparison of ORT's integer activations with the reference graph's."""
    probe = probe_model(emitted)
    sess, optimized = make_session(probe, threads)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, feeds(emitted, flat))))
    want = reference_values(ref, flat, [qi.fx_node for qi in emitted.quantized])
    layers, first = [], None
    upstream = _upstream_quantized(ref)
    by_source = {}
    for qi in emitted.quantized:
        if qi.value not in got or qi.fx_node not in want:
            continue
        r = want[qi.fx_node].to(torch.int64)
        o = torch.from_numpy(got[qi.value].astype(np.int64))
        steps = (r - o).abs()
        s = sqnr((r - qi.zero_point).double(), (o - qi.zero_point).double())
        inputs = [by_source[u]["sqnr_db"] for u in upstream.get(qi.fx_node, ()) if u in by_source]
        row = {"layer": qi.module or "(top)", "value": qi.source, "sqnr_db": s,
               "within_one_step": float((steps <= 1).double().mean()), "max_steps": int(steps.max()),
               "local_drop_db": (min(inputs) - s) if inputs and math.isfinite(min(inputs)) else 0.0}
        by_source[qi.fx_node] = row
        layers.append(row)
        if first is None and s < threshold_db:
            first = row
    probe_rg = analyze(optimized, {n.name for n in emitted.model.graph.node}, producers(emitted.model))
    kernels = {k: v for k, v in probe_rg.int_ops.items() if k in INT_KERNELS}
    return {"layers": layers, "first_drop": first, "probe_int_ops": kernels}


def _upstream_quantized(ref: fx.GraphModule) -> dict:
    """quantize node -> the quantize nodes whose values reach it without another quantization."""
    q_target = torch.ops.quantized_decomposed.quantize_per_tensor.default
    memo: dict = {}

    def sources(node) -> frozenset:
        if node.name not in memo:
            found = set()
            for a in node.all_input_nodes:
                found |= {a.name} if a.target == q_target else sources(a)
            memo[node.name] = frozenset(found)
        return memo[node.name]
    return {n.name: sources(n) for n in ref.graph.nodes if n.target == q_target}


def summarize(parity: dict, threshold_db: float) -> dict:
    layers = parity["layers"]
    finite = [r["sqnr_db"] for r in layers if math.isfinite(r["sqnr_db"])]
    first = parity["first_drop"]
    # a drop from 70 to 55 dB is still agreement: only layers within 15 dB of the threshold count
    worst = max((r for r in layers if r["sqnr_db"] < threshold_db + 15), key=lambda r: r["local_drop_db"], default=None)
    return {
        "layers_compared": len(layers),
        "min_layer_sqnr_db": min(finite) if finite else math.inf,
        "min_layer_within_one_step": min((r["within_one_step"] for r in layers), default=1.0),
        "first_sqnr_drop": (f"{first['layer']} ({first['value']}): {first['sqnr_db']:.1f} dB < {threshold_db} dB"
                            if first else "none"),
        "largest_local_sqnr_drop": (f"{worst['layer']} ({worst['value']}): -{worst['local_drop_db']:.1f} dB vs "
                                    f"its inputs" if worst is not None and worst["local_drop_db"] > 0 else "none"),
        "per_layer_sqnr_db": {f"{r['layer']} ({r['value']})": round(r["sqnr_db"], 2) for r in layers},
    }


def qdq_params(model: onnx.ModelProto) -> dict:
    """Every QuantizeLinear / DequantizeLinear in ``model``: name -> scale, zero point, dtype, axis, and
    the integer initializer it dequantizes (weights / int32 biases) when there is one."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        zp = inits.get(node.input[2]) if len(node.input) > 2 else None
        out[node.name] = {"op": node.op_type, "scale": inits[node.input[1]], "zero_point": zp,
                          "dtype": None if zp is None else zp.dtype, "axis": axis,
                          "data": inits.get(node.input[0])}
    return out
