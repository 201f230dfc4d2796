"""ONNX Runtime side: build the session, read back the graph ORT actually executes.

ORT writes its optimized graph when ``SessionOptions.optimized_model_filepath`` is set. After the QDQ
transformers ran, a group that became an integer kernel shows up as ``QLinearConv`` / ``QGemm`` /
``QLinearMatMul`` / ``QLinearAdd``... (or as a data-movement op on a uint8 tensor); a group that did not
is still a float op between a ``DequantizeLinear`` and a ``QuantizeLinear``. Fused nodes keep the name
of the node they replace (the NHWC / NCHWc layout passes append ``_token_<n>``), which is how every ORT
node is traced back to our ONNX node and from there to the reference graph.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

INT_KERNELS = {
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "QLinearAdd",
    "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearSoftmax",
    "QLinearLeakyRelu", "QLinearConcat", "QLinearWhere", "ConvInteger", "DynamicQuantizeMatMul",
    "QLinearReduceMean", "MatMulNBits", "MatMulBnb4", "QAttention", "QEmbedLayerNormalization", "QOrderedMatMul",
}
QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}  # (de)quantizers: no computation of their own
_INTS = {TensorProto.UINT8, TensorProto.INT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT4,
         TensorProto.UINT4}
# index of the output zero point of QLinear* ops (their output dtype)
_Y_ZP = {"QuantizeLinear": 2, "QLinearConv": 7, "QLinearMatMul": 7, "QLinearAdd": 7, "QLinearMul": 7,
         "QGemm": 8, "QLinearGlobalAveragePool": 4, "QLinearAveragePool": 4, "QLinearSigmoid": 4,
         "QLinearSoftmax": 4, "QLinearLeakyRelu": 4, "QLinearWhere": 8, "QLinearConcat": 1}
_FLOAT_OUT = {"DequantizeLinear", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "MatMulBnb4"}
_TOKEN = re.compile(r"(_token_\d+)+$")


@dataclass
class RuntimeGraph:
    """What ORT runs: each optimized node's op and whether it computes on integers."""

    ops: dict = field(default_factory=dict)      # our ONNX node name -> (ORT op type, integer?)
    counts: Counter = field(default_factory=Counter)
    int_ops: Counter = field(default_factory=Counter)
    float_ops: Counter = field(default_factory=Counter)
    unmapped: Counter = field(default_factory=Counter)   # ORT's own nodes (layout Transposes, decompositions)
    float_between_qdq: list = field(default_factory=list)  # ORT node names running float inside Q/DQ


def ort_version() -> str:
    import onnxruntime as ort
    return ort.__version__


def session_options(threads: int | None = None, optimized_path: str | None = None, level: str = "all"):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    so.log_severity_level = 3  # the NCHWc "hardware specific" warning is expected when we read the graph
    if threads:
        so.intra_op_num_threads = threads
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


def make_session(model: onnx.ModelProto, threads: int | None = None, level: str = "all", read_back: bool = True):
    """(InferenceSession, optimized ModelProto or None) on the CPU execution provider."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory(prefix="qcompile-ort-") as tmp:
        path = os.path.join(tmp, "optimized.onnx") if read_back else None
        so = session_options(threads, path, level)
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(path) if read_back else None
    return sess, optimized


def _dtypes(model: onnx.ModelProto) -> dict:
    types = {i.name: i.data_type for i in model.graph.initializer}
    for v in list(model.graph.input) + list(model.graph.value_info):
        types[v.name] = v.type.tensor_type.elem_type
    for node in model.graph.node:
        if node.op_type in _Y_ZP and len(node.input) > _Y_ZP[node.op_type] and node.input[_Y_ZP[node.op_type]]:
            t = types.get(node.input[_Y_ZP[node.op_type]], TensorProto.UINT8)
        elif node.op_type in _FLOAT_OUT or node.op_type in _Y_ZP:
            t = TensorProto.FLOAT
        elif node.op_type in ("MatMulInteger", "ConvInteger"):
            t = TensorProto.INT32
        elif node.op_type in ("Shape", "Size"):
            t = TensorProto.INT64
        elif node.op_type == "Cast":
            t = next(a.i for a in node.attribute if a.name == "to")
        else:
            t = types.get(node.input[0], TensorProto.FLOAT) if node.input else TensorProto.FLOAT
        for o in node.output:
            types[o] = t
    return types


def original_name(ort_name: str) -> str:
    return _TOKEN.sub("", ort_name)


def producers(model: onnx.ModelProto) -> dict:
    """value name -> name of the node of ``model`` that writes it."""
    return {o: n.name for n in model.graph.node for o in n.output}


def _our_name(node, ours: set | None, produced: dict) -> str | None:
    """Our node an ORT node stands for: by name (ORT keeps the replaced node's name, plus ``_token_<n>``), else
    by the value it writes (a fusion ORT names itself, e.g. SkipLayerNormalization, writes the last fused
    node's output)."""
    name = original_name(node.name)
    if ours is None or name in ours:
        return name
    return next((produced[o] for o in node.output if o in produced), None)


def analyze(optimized: onnx.ModelProto, ours: set | None = None, produced: dict | None = None) -> RuntimeGraph:
    """Classify every node ORT runs as integer or float, keyed by the name of our node it came from.
    Nodes that trace back to none of ``ours`` (layout Transposes, NCHWc Reorders) are counted apart.
    ``produced``: value -> our node (``producers``), to trace the fusions ORT names itself."""
    types = _dtypes(optimized)
    producers = {o: n for n in optimized.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in optimized.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    rg = RuntimeGraph()
    for node in optimized.graph.node:
        op = node.op_type
        rg.counts[op] += 1
        if op in QDQ or op in ("Shape", "Constant", "Identity"):
            continue
        name = _our_name(node, ours, produced or {})
        if name is None:
            rg.unmapped[op] += 1
            continue
        integer = op in INT_KERNELS or (bool(node.input) and types.get(node.input[0]) in _INTS)
        (rg.int_ops if integer else rg.float_ops)[op] += 1
        rg.ops.setdefault(name, (op, integer))
        if not integer and _between_qdq(node, producers, consumers):
            rg.float_between_qdq.append(node.name)
    return rg


def _between_qdq(node, producers, consumers) -> bool:
    """A float op reading a dequantized *activation* and feeding a QuantizeLinear."""
    fed = any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
              and producers[i].input[0] in producers for i in node.input)
    feeds = any(c.op_type == "QuantizeLinear" for o in node.output for c in consumers.get(o, []))
    return fed and feeds
