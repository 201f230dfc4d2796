"""Each backend's peer tool, run on the same model and data as qcompile.

    x86         torch.ao FX (``prepare_fx`` / ``convert_fx``, x86 qconfig mapping; runs fbgemm / oneDNN kernels);
                where FX cannot trace the model: PT2E ``X86InductorQuantizer`` (torchao), run as its q/dq
                reference graph in eager mode (Inductor would fuse the same groups). Dynamic: ``quantize_dynamic``.
    onnx        ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, uint8 activations / int8
                weights, MinMax) on the float model exported by ``torch.onnx.export(dynamo=True)``;
                dynamic: ``quantize_dynamic`` (int8 weights). Run by ONNX Runtime's CPU provider.
    executorch  ``XNNPACKQuantizer`` (symmetric, per-channel; dynamic: ``is_dynamic=True``) + PT2E prepare /
                convert -> ``to_edge_transform_and_lower(XnnpackPartitioner)`` -> ``executorch.runtime``.

Each peer returns ``Peer(outs, int8_macs, method)``: its outputs on the held-out inputs and the MACs of the
GEMMs it runs in int8 (on the first held-out input) (conformance_macs formula). Counting int8 GEMMs:
    torch.ao FX   quantized Conv / Linear modules (static and dynamic) and ``quantized::matmul`` calls;
    PT2E          conv / linear / matmul nodes whose activation and weight inputs are dequantize nodes;
    ORT           integer ops, or Conv / MatMul / Gemm whose data and weight inputs are DequantizeLinear;
    ExecuTorch    GEMMs inside an XNNPACK delegate whose activation input is a dequantize node.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import fx

from conformance_macs import (GEMM_OPS, ShapeRecorder, dead_gemm_modules, gemm_macs, live_nodes, node_macs,
                             onnx_int8_macs, op_short)


@dataclass
class Peer:
    outs: list
    int8_macs: int
    method: str


_ALIVE = []  # ExecuTorch programs: a loaded method must not outlive its program


def _calibrate(m, calib):
    with torch.no_grad():
        for c in calib:
            m(*c)


# -- x86 ----------------------------------------------------------------------------------------------
def x86(model, example, calib, helds, mode):
    if mode == "dynamic":
        return _x86_dynamic(model, helds)
    try:
        return _x86_fx(model, example, calib, helds)
    except Exception as fx_error:  # noqa: BLE001 - FX cannot trace most transformers models: PT2E then
        peer = _x86_pt2e(model, example, calib, helds)
        peer.method += f" (FX: {type(fx_error).__name__})"
        return peer


def _run_all(fn, helds) -> list:
    with torch.no_grad():
        return [fn(*h) for h in helds]


def _x86_fx(model, example, calib, helds):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), example)
    _calibrate(prepared, calib)
    q = convert_fx(prepared)
    return Peer(_run_all(q, helds), _ao_int8_macs(q, helds[0]), "torch.ao FX x86")


def _ao_int8_macs(gm: fx.GraphModule, args) -> int:
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd
    rec = ShapeRecorder(gm)
    with torch.no_grad():
        rec.run(*args)
    mods, total, live = dict(gm.named_modules()), 0, live_nodes(gm.graph)
    for n in gm.graph.nodes:
        out = rec.shapes.get(n)
        if out is None or n not in live:
            continue
        if n.op == "call_module":
            m = mods[n.target]
            if isinstance(m, (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d)):
                total += out.numel() * _prod(m.weight().shape[1:])
            elif isinstance(m, (nnq.Linear, nnqd.Linear)):
                total += out.numel() * m.in_features
        elif n.op == "call_function" and "quantized" in str(n.target) and op_short(n.target) == "matmul":
            total += out.numel() * rec.shapes[n.args[0]][-1]
    return total


def _prod(shape) -> int:
    p = 1
    for d in shape:
        p *= int(d)
    return p


def _skip_partitions_without_outputs(xiq) -> None:
    """torchao 0.18's X86InductorQuantizer raises IndexError on a (linear, GELU) source partition with
    no output node (Hugging Face's GELUActivation in torch 2.13 export graphs): drop such fusion
    candidates, so those linears are annotated alone, as the quantizer does for reused modules."""
    find = xiq.find_sequential_partitions
    if getattr(find, "_conformance", False):
        return

    def filtered(gm, partition_types, *args, **kwargs):
        return [fp for fp in find(gm, partition_types, *args, **kwargs) if all(p.output_nodes for p in fp)]
    filtered._conformance = True
    xiq.find_sequential_partitions = filtered


def _x86_pt2e(model, example, calib, helds):
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    _skip_partitions_without_outputs(xiq)
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    _calibrate(prepared, calib)
    q = convert_pt2e(prepared)
    return Peer(_run_all(q, helds), _dq_gemm_macs(q, helds[0]), "torchao PT2E X86InductorQuantizer (q/dq reference)")


def _act_index(node: fx.Node) -> int:
    """Argument index of the activation: addmm / baddbmm take the bias first."""
    return 1 if op_short(node.target) in ("addmm", "baddbmm") else 0


def _is_dq(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and "dequantize" in str(node.target)


def _dq_gemm_macs(gm: fx.GraphModule, args) -> int:
    """MACs of GEMM nodes whose activation and (for conv / linear) weight inputs are dequantize nodes."""
    rec = ShapeRecorder(gm)
    with torch.no_grad():
        rec.run(*args)
    total, live = 0, live_nodes(gm.graph)
    for n in gm.graph.nodes:
        if n.op != "call_function" or op_short(n.target) not in GEMM_OPS or rec.shapes.get(n) is None or n not in live:
            continue
        a = _act_index(n)
        if not (_is_dq(n.args[a]) and (len(n.args) < a + 2 or _is_dq(n.args[a + 1]))):
            continue
        shaped = tuple(_MetaShape(rec.shapes.get(a)) if isinstance(a, fx.Node) else a for a in n.args)
        total += gemm_macs(op_short(n.target), shaped, tuple(rec.shapes[n]))
    return total


class _MetaShape:
    def __init__(self, shape):
        self.shape = tuple(shape) if shape is not None else None


def _x86_dynamic(model, helds):
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization import quantize_dynamic
    dead = dead_gemm_modules(model, helds[0])  # run in eager, but their output is never read
    q = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    macs = []
    hooks = [m.register_forward_hook(lambda m, i, o: macs.append(o.numel() * m.in_features))
             for name, m in q.named_modules() if isinstance(m, nnqd.Linear) and name not in dead]
    with torch.no_grad():
        q(*helds[0])
    for h in hooks:
        h.remove()
    return Peer(_run_all(q, helds), sum(macs), "torch.ao quantize_dynamic (nn.Linear)")


# -- ONNX Runtime ---------------------------------------------------------------------------------------
def onnx(model, example, calib, helds, mode, tmp: str):
    import onnx as onnx_pkg
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    names = ["x", "attention_mask"][:len(example)]
    fp = os.path.join(tmp, "float.onnx")
    torch.onnx.export(model, example, dynamo=True, input_names=names, verbose=False).save(fp)
    pre = os.path.join(tmp, "float_pre.onnx")
    try:
        quant_pre_process(fp, pre)
    except Exception:  # noqa: BLE001 - ORT's pre-processing is optional
        pre = fp
    out_path = os.path.join(tmp, "ort_int8.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {n: t.numpy() for n, t in zip(names, b)}
    if mode == "dynamic":
        quantize_dynamic(pre, out_path, weight_type=QuantType.QInt8)
        method = "ORT quantize_dynamic (int8 weights)"
    else:
        quantize_static(pre, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        method = "ORT quantize_static (QDQ, per-channel, u8/s8)"
    sess = ort_session(out_path)
    outs = [torch.from_numpy(sess.run(None, ort_feeds(sess, h, names))[0]) for h in helds]
    int8, _ = onnx_int8_macs(onnx_pkg.load(out_path))
    return Peer(outs, int8, method)


def ort_session(path_or_bytes):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def ort_feeds(sess, args, names=None) -> dict:
    inputs = [i.name for i in sess.get_inputs()]
    if names and set(inputs) <= set(names):
        by_name = dict(zip(names, args))
        return {n: by_name[n].contiguous().numpy() for n in inputs}
    return {n: a.contiguous().numpy() for n, a in zip(inputs, args)}


# -- ExecuTorch ------------------------------------------------------------------------------------------
def executorch(model, example, calib, helds, mode):
    try:
        return _executorch(model, example, calib, helds, mode, stock=True)
    except Exception as e:  # noqa: BLE001
        peer = _executorch(model, example, calib, helds, mode, stock=False)
        peer.method += f" (stock quantizer: {type(e).__name__}; retried without scalar-to-tensor conversion)"
        return peer


def _executorch(model, example, calib, helds, mode, stock: bool):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    class NoScalarAttrs(XNNPACKQuantizer):
        """XNNPACKQuantizer turns every scalar operand into a float tensor constant, also on integer ops:
        Hugging Face's mask code ``arange(n) + 0`` then yields float indices (IndexError). Skip that."""

        def transform_for_annotation(self, gm):
            return gm
    cfg = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=mode == "dynamic")
    quantizer = (XNNPACKQuantizer() if stock else NoScalarAttrs()).set_global(cfg)
    prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    _calibrate(prepared, calib)
    converted = convert_pt2e(prepared)
    edge = to_edge_transform_and_lower(torch.export.export(converted, example), partitioner=[XnnpackPartitioner()])
    macs = delegated_int8_macs(edge.exported_program().graph_module)
    outs = run_pte(bytes(edge.to_executorch().buffer), helds)
    return Peer(outs, macs, f"ExecuTorch XNNPACKQuantizer ({mode}) + XnnpackPartitioner")


def run_pte(buffer: bytes, inputs: list) -> list:
    """The program's first output on each input tuple of ``inputs`` (one load)."""
    from executorch.runtime import Runtime
    program = Runtime.get().load_program(buffer)
    _ALIVE.append((buffer, program))
    method = program.load_method("forward")
    return [method.execute([a.contiguous() for a in args])[0] for args in inputs]


def delegated_int8_macs(gm: fx.GraphModule) -> int:
    """MACs of GEMMs inside XNNPACK delegates whose activation input is dequantized (int8 compute)."""
    total = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.name.startswith("lowered_module_"):
            for inner in getattr(gm, node.name).original_module.graph.nodes:
                if node_macs(inner) and _is_dq(inner.args[_act_index(inner)]):
                    total += node_macs(inner)
    return total


PEERS = {"x86": x86, "onnx": onnx, "executorch": executorch}
