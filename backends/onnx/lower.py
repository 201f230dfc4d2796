"""Lower the reference graph: emit ONNX, check it, open an ORT session, read back what ORT runs.

The result carries ``kernels`` / ``fallbacks`` keyed by reference node names, like the x86 backend's
``LowerResult``: a node the support table planned in int8 that ORT still runs as a float op between
DequantizeLinear and QuantizeLinear is a fallback ("float on onnxruntime-CPU: <op> ...").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from torch import fx

from qcompile import annotation as A

from .emit import EmitOptions, emit
from .emitted import Emitted, flat_inputs  # noqa: F401  (flat_inputs: re-exported for backend.py)
from ..base import Lowered
from .runtime import INT_KERNELS, QDQ, RuntimeGraph, analyze, make_session, producers

qd = torch.ops.quantized_decomposed
Q_OPS = {qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor}
DQ_OPS = {qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default, qd.dequantize_per_tensor.tensor}
_AUX = QDQ | {"Shape", "Concat", "Identity"}  # bookkeeping nodes that never carry a node's computation


@dataclass
class OnnxLowered(Lowered):
    """kernels: reference node -> ORT kernel; fallbacks: reference node -> why it runs in float on ORT;
    gm: storage view (the initializers as (meta) buffers, see storage_view); storage: its tags."""

    model: onnx.ModelProto
    session: object                       # onnxruntime.InferenceSession
    emitted: Emitted
    runtime: RuntimeGraph
    out_spec: object = None               # pytree spec of the model's output
    notes: list = field(default_factory=list)


def lower(ref: fx.GraphModule, args: tuple, kwargs: dict, opts: EmitOptions, threads: int | None = None,
          user_table: dict | None = None) -> OnnxLowered:
    flat = flat_inputs(args, kwargs)
    emitted = emit(ref, args, kwargs, opts, user_table)
    session, optimized = make_session(emitted.model, threads)
    _run_once(session, emitted, flat)
    notes = list(emitted.notes)
    if emitted.dynamic_batch:
        why = _dynamic_batch_problem(session, emitted, flat)
        if why:
            notes.append(f"dynamic batch disabled: the graph bakes in the example batch size ({why})")
            emitted = emit(ref, args, kwargs, dataclasses.replace(opts, dynamic_batch=False), user_table)
            session, optimized = make_session(emitted.model, threads)
    rg = analyze(optimized, {n.name for n in emitted.model.graph.node}, producers(emitted.model))
    low = OnnxLowered(emitted.model, session, emitted, rg, _out_spec(ref), notes=notes)
    low.kernels, low.fallbacks = classify(ref, emitted, rg)
    for name, (op, note) in emitted.kernel_notes.items():  # what the emitted low-bit / dynamic op runs
        if low.kernels.get(name) in _NOTED.get(op, ()):
            low.kernels[name] = f"{low.kernels[name]} ({note})"
    for name in folded_by_ort(emitted, rg):
        low.kernels.setdefault(name, "none: ORT folded it into a constant at session load (constant inputs)")
    for name in folded_at_export(ref, emitted):
        low.kernels.setdefault(name, "none: folded into a constant at export (constant inputs)")
    low.gm, low.storage = storage_view(emitted.model, emitted.storage)
    return low


def _run_once(session, emitted: Emitted, flat: list) -> None:
    """The artifact is proven on the runtime before compile returns (also with verify=False)."""
    from qcompile.errors import UnsupportedError
    try:
        session.run(None, feeds(emitted, flat))
    except Exception as e:  # noqa: BLE001 - ORT's message is the reason
        raise UnsupportedError(f"onnx backend: ONNX Runtime loaded the model but could not run it on the example "
                               f"inputs: {str(e).strip().splitlines()[0][:300]}") from e


def folded_at_export(ref: fx.GraphModule, emitted: Emitted) -> list:
    """Planned group anchors with no ONNX node at all: torch.onnx's optimizer folded them (e.g. the
    position-embedding gather of a fixed ``arange``)."""
    out = []
    for node in ref.graph.nodes:
        ann = A.get_annotation(node) if node.op == "call_function" else None
        if ann is not None and ann.status == A.INT8 and ann.group == node.name and node.name not in emitted.onnx_of:
            out.append(node.name)
    return out


def folded_by_ort(emitted: Emitted, rg: RuntimeGraph) -> list:
    """Reference nodes whose ONNX nodes compute from initializers alone (e.g. the position-embedding
    gather of a fixed ``arange``): ORT folds them into constants at session load, nothing runs for them."""
    const = {i.name for i in emitted.model.graph.initializer}
    folded = set()
    for n in emitted.model.graph.node:  # topological order
        if n.op_type != "DequantizeLinear" and all(i in const for i in n.input if i):  # ORT keeps DQ unfolded
            const.update(n.output)
            folded.add(n.name)
    return [fx_name for fx_name, names in emitted.onnx_of.items()
            if names and all(n in folded and n not in rg.ops for n in names)]


# emitted op -> the ORT kernels its note describes (a note never goes to a kernel ORT put in its place)
_NOTED = {"MatMulInteger": ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"),
          "MatMulNBits": ("MatMulNBits",), "MatMulBnb4": ("MatMulBnb4",), "Gather": ("Gather",)}


def storage_view(model: onnx.ModelProto, tags: dict) -> tuple[fx.GraphModule, dict]:
    """The model's initializers as an fx.GraphModule of meta-device buffers (shapes and dtypes, no data)
    read by the core's storage report (``qcompile.report.storage_rows``: stored bytes, bits per weight).
    Buffer names are the initializer names with ``.`` -> ``_`` (fx attribute names); tags follow them."""
    root, graph, out_tags = torch.nn.Module(), fx.Graph(), {}
    for init in model.graph.initializer:
        dtype = torch.from_numpy(np.zeros(1, onnx.helper.tensor_dtype_to_np_dtype(init.data_type))).dtype
        name = init.name.replace(".", "_")
        while hasattr(root, name):
            name += "_"
        root.register_buffer(name, torch.empty(tuple(init.dims), dtype=dtype, device="meta"))
        graph.get_attr(name)
        if init.name in tags:
            out_tags[name] = tags[init.name]
    graph.output(None)
    return fx.GraphModule(root, graph, class_name="OnnxInitializers"), out_tags


def feeds(emitted: Emitted, flat: list) -> dict:
    return {name: v.detach().cpu().numpy() for name, v in zip(emitted.inputs, flat) if name is not None}


def _out_spec(ref: fx.GraphModule):
    info = getattr(ref.graph._codegen, "pytree_info", None)
    return info.out_spec if info is not None else None


def _dynamic_batch_problem(session, emitted: Emitted, flat: list) -> str | None:
    """Run at batch + 1 (the first sample repeated at the end); a graph that baked the example batch into a
    constant fails or misshapes here, or changes the example's rows. (A batch-1 capture is never made
    dynamic, see ``emit.emit``: a repeated sample cannot show that it mixes samples.)"""
    grown = [torch.cat([v, v[:1]]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for v in flat]
    batch = next(v.shape[0] for v in grown if isinstance(v, torch.Tensor) and v.dim() > 0)
    try:
        base = session.run(None, feeds(emitted, flat))
        outs = session.run(None, feeds(emitted, grown))
    except Exception as e:  # noqa: BLE001 - the message is the reason
        return str(e).splitlines()[0][:200]
    bad = [o.shape for o in outs if o.ndim and o.shape[0] != batch]
    if bad:
        return f"outputs {bad} do not follow the batch"
    for o, b in zip(outs, base):
        if o.ndim and np.issubdtype(o.dtype, np.floating) and b.size:
            tol = 1e-3 * max(float(np.abs(b).max()), 1e-6)
            if not (np.allclose(o[:-1], b, rtol=0, atol=tol) and np.allclose(o[-1], b[0], rtol=0, atol=tol)):
                return "a batch of one more sample changes the other samples' outputs"
    return None


def classify(ref: fx.GraphModule, emitted: Emitted, rg: RuntimeGraph) -> tuple[dict, dict]:
    """Reference node -> ORT kernel (int8 groups and float ops) and -> fallback reason.

    A node's kernel is what ORT runs for the ONNX nodes emitted for it: an integer kernel if there is one
    (QLinearConv, QGemm, MatMulIntegerToFloat, a Reshape on uint8...), else its float op. Nodes whose ONNX
    node was fused away (the Relu folded into a QLinearConv) take their group anchor's kernel."""
    op_type = {n.name: n.op_type for n in emitted.model.graph.node}
    kernels, fallbacks, groups = {}, {}, {}
    for node in ref.graph.nodes:
        if node.op != "call_function" or node.target in Q_OPS or node.target in DQ_OPS:
            continue
        ann = A.get_annotation(node)
        planned = ann is not None and ann.status == A.INT8
        found = [rg.ops[n] for n in emitted.onnx_of.get(node.name, []) if n in rg.ops and op_type.get(n) not in _AUX]
        if not found and planned and ann.group in groups:
            found = [groups[ann.group]]
        if not found:
            continue
        op, integer = _pick(found)
        if planned and ann.group == node.name:
            groups[node.name] = (op, integer)
        if planned and not integer:
            fallbacks[node.name] = (f"float on onnxruntime-CPU: {op} runs in float between DequantizeLinear and "
                                    f"QuantizeLinear (no integer kernel for this group)")
        else:
            kernels[node.name] = op if integer else f"{op} (float)"
    return kernels, fallbacks


def _pick(found: list) -> tuple[str, bool]:
    """Prefer an integer kernel (QLinearConv...), then any op on integers, then the float op."""
    return next((f for f in found if f[0] in INT_KERNELS), None) or next((f for f in found if f[1]), found[-1])
