"""Emit the quantize/dequantize reference graph as a standard ONNX QDQ model.

One walk over the reference graph, in order. Every fx node becomes one or a few ONNX nodes whose
names start with the PyTorch module path (``layer1.0.conv1/conv2d_3``), so Netron, ORT's profiler and
our report all point back to the model's source:

* ``quantize_per_tensor`` / ``dequantize_per_tensor`` -> ``QuantizeLinear`` / ``DequantizeLinear``
  with scalar scale / zero-point initializers (shared between a Q and its DQ);
* integer constant -> ``dequantize_per_channel`` / ``dequantize_per_tensor`` (weights, and the int32
  biases ``bias.QuantizeBias`` put in the reference) -> integer initializer -> ``DequantizeLinear`` with
  the right ``axis`` (0 for Conv / Gemm, 1 for ConvTranspose and for MatMul's transposed weight);
* other ATen ops -> their ONNX equivalents (``ops.py``, ``ops_basic.py``); nodes computed from
  constants alone are folded into initializers. An op with no mapping raises
  :class:`UnsupportedError` naming the node, its module and source line;
* dynamic / weight-only graphs (run-time ``choose_qparams`` chains, per-group and NF4 weights) ->
  ``DynamicQuantizeLinear`` + ``MatMulInteger``, ``com.microsoft`` ``MatMulNBits`` / ``MatMulBnb4``
  (``ops_lowbit.py``); low-bit weight dequantizes are never folded to float.

Every initializer a layer stores is tagged (``Emitter.tag``: codes / scales / zero points / bias) for the
stored-bytes report.

The ONNX ``onnx.helper`` API builds every message; nothing is written as raw protobuf.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx

import qcompile.lowbit  # noqa: F401  registers qcompile::dequantize_nf4
from qcompile.errors import ConfigError, UnsupportedError, where
from qcompile.ir import get_attr_value, module_path

qd = torch.ops.quantized_decomposed
Q_OPS = {qd.quantize_per_tensor.default}
DQ_OPS = {qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default}
# low-bit weight dequantizes (weight-only mode): emitted where a linear reads them, never folded to float
LOWBIT_DQ_OPS = {qd.dequantize_per_channel_group.default, torch.ops.qcompile.dequantize_nf4.default}
MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
MAX_OPSET = 21  # newest opset every handler here is written against (ORT 1.18+ runs it)

TORCH_TO_ONNX = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.float64: TensorProto.DOUBLE,
    torch.bfloat16: TensorProto.BFLOAT16, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
    torch.int16: TensorProto.INT16, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
    torch.bool: TensorProto.BOOL,
}
_SKIP = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_assert_async"}


@dataclass(frozen=True)
class EmitOptions:
    opset: int | None = None       # None: the lowest opset the graph needs (>= 13)
    dynamic_batch: bool = True     # symbolic batch dimension on inputs and outputs
    accuracy_level: int | None = None  # MatMulNBits accuracy_level (None: 0 for <= 4-bit blocks, 4 for 8-bit)


@dataclass(frozen=True)
class QInfo:
    """An activation QuantizeLinear in the emitted model and the reference node it came from."""

    fx_node: str      # reference quantize node
    value: str        # ONNX name of its (integer) output
    source: str       # reference node whose float output it quantizes
    module: str
    scale: float
    zero_point: int
    dtype: torch.dtype


@dataclass
class Emitted:
    model: onnx.ModelProto
    opset: int
    dynamic_batch: bool
    inputs: list                                     # ONNX input names, in placeholder order
    outputs: list                                    # ONNX output names (None for non-tensor leaves)
    out_template: list                               # output leaves: None = tensor from ORT, else a constant
    node_of: dict = field(default_factory=dict)      # ONNX node name -> reference fx node name
    onnx_of: dict = field(default_factory=dict)      # reference fx node name -> [ONNX node names]
    quantized: list = field(default_factory=list)    # QInfo of every activation quantize node
    weights: dict = field(default_factory=dict)      # ONNX weight DQ node name -> reference dq node name
    notes: list = field(default_factory=list)
    storage: dict = field(default_factory=dict)      # initializer -> (reference layer, role, weights it holds)
    kernel_notes: dict = field(default_factory=dict)  # reference node -> (ONNX op emitted for it, what it runs)


def np_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype


class Emitter:
    """Walk the reference graph once and collect ONNX nodes and initializers."""

    def __init__(self, ref: fx.GraphModule, example_args: tuple, options: EmitOptions, ops: dict):
        self.ref, self.opts, self.ops = ref, options, ops
        self.example = example_args
        self.nodes: list = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self._init_keys: dict[tuple, str] = {}
        self.env: dict[str, object] = {}       # fx name -> ONNX value name (or list for tuple outputs)
        self.consts: dict[str, object] = {}    # fx name -> folded constant value (tensor / python value)
        self.used: set[str] = set()
        self.lazy: dict[str, object] = {}      # fx name -> emit(em, node), run on first use (weights)
        self.cache: dict[tuple, object] = {}   # memo for handlers (weight layouts, shapes)
        self.batch = self._example_batch()
        # torch.export specializes a batch of 1: such a graph may bake it in without any shape showing it
        # (MiniLM captured at batch 1 ran at batch 3 without error, 17 dB from float), so it stays fixed
        self.dynamic = options.dynamic_batch and self.batch is not None and self.batch > 1
        self._batch_value: str | None = None
        self.opset = self._choose_opset()
        self.out = Emitted(None, self.opset, self.dynamic, [], [], [])
        if options.dynamic_batch and self.batch == 1:
            self.out.notes.append("dynamic batch disabled: the example batch is 1, which torch.export specializes "
                                  "(compile with an example batch >= 2 for a symbolic batch dimension)")

    # -- setup ------------------------------------------------------------------------------------
    def _example_batch(self) -> int | None:
        for a in self.example:
            if isinstance(a, torch.Tensor) and a.dim() > 0:
                return int(a.shape[0])
        return None

    def _choose_opset(self) -> int:
        need, why, best = MIN_OPSET, "per-channel QuantizeLinear/DequantizeLinear", MIN_OPSET
        for node in self.ref.graph.nodes:
            entry = self.ops.get(node.target) if node.op == "call_function" else None
            if entry is None:
                continue
            best = max(best, entry.best_opset, entry.min_opset)
            if entry.min_opset > need:
                need, why = entry.min_opset, f"{node.name} ({entry.onnx_op})"
        if self.opts.opset is None:
            return best
        if not MIN_OPSET <= self.opts.opset <= MAX_OPSET:
            raise ConfigError(f"onnx backend: opset={self.opts.opset} is outside the supported range "
                              f"[{MIN_OPSET}, {MAX_OPSET}] (per-channel QDQ needs >= {MIN_OPSET})")
        if self.opts.opset < need:
            raise ConfigError(f"onnx backend: opset={self.opts.opset} is too old for this graph: {why} needs "
                              f"opset >= {need}. Pass backend_options={{'opset': {need}}} or leave opset unset.")
        return self.opts.opset

    # -- naming -----------------------------------------------------------------------------------
    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    @staticmethod
    def base_name(node: fx.Node, suffix: str = "") -> str:
        path = module_path(node)
        return f"{path}/{node.name}{suffix}" if path else f"{node.name}{suffix}"

    # -- building blocks --------------------------------------------------------------------------
    def add(self, op: str, inputs: list, src: fx.Node, n_out: int = 1, suffix: str = "", domain: str = "",
            name: str | None = None, **attrs):
        """Append one ONNX node made for reference node ``src``; return its output name(s)."""
        name = self.unique(name or self.base_name(src, suffix))
        outs = [name] if n_out == 1 else [self.unique(f"{name}:{i}") for i in range(n_out)]
        node = helper.make_node(op, [i or "" for i in inputs], outs, name=name, domain=domain or None, **attrs)
        helper.set_metadata_props(node, {"qcompile.fx_node": src.name, "qcompile.module": module_path(src)})
        self.nodes.append(node)
        self.out.node_of[name] = src.name
        self.out.onnx_of.setdefault(src.name, []).append(name)
        return outs[0] if n_out == 1 else outs

    def init(self, value, hint: str, dtype: torch.dtype | None = None, share: bool = True) -> str:
        """An initializer holding ``value``; small ones are shared by content unless ``share=False``."""
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            arr = t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
        else:
            arr = np.asarray(value, dtype=np_dtype(dtype) if dtype is not None else None)
        if dtype is not None and arr.dtype != np_dtype(dtype):
            arr = arr.astype(np_dtype(dtype))
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if share and arr.size <= 4096 else None
        if key is not None and key in self._init_keys:
            return self._init_keys[key]
        name = self.unique(hint)
        self.inits[name] = numpy_helper.from_array(arr, name)
        if key is not None:
            self._init_keys[key] = name
        return name

    def tag(self, name: str, layer: str, role: str, weights: int = 0) -> str:
        """Account initializer ``name`` to reference layer ``layer`` in the storage report (role: codes,
        scales, zero_points, bias); the first tag of a shared initializer wins."""
        self.out.storage.setdefault(name, (layer, role, int(weights)))
        return name

    def ints(self, values, hint: str = "const") -> str:
        return self.init(np.asarray(list(values), dtype=np.int64), hint)

    # -- values -----------------------------------------------------------------------------------
    def value(self, arg, hint: str = "const") -> str:
        """ONNX value name for an fx argument (materializing folded constants as initializers)."""
        if isinstance(arg, fx.Node):
            if arg.name in self.env:
                return self.env[arg.name]
            if arg.name in self.lazy:
                return self.lazy[arg.name](self, arg)
            if arg.name in self.consts:
                v = self.consts[arg.name]
                hint = arg.target if arg.op == "get_attr" else self.base_name(arg)
                name = self.init(v if isinstance(v, torch.Tensor) else torch.tensor(v), hint)
                self.env[arg.name] = name
                return name
            raise UnsupportedError(f"onnx backend: {where(arg)} is used before it was emitted")
        if isinstance(arg, torch.Tensor):
            return self.init(arg, hint)
        if isinstance(arg, (int, float, bool)):
            return self.init(np.asarray(arg, dtype=np.float32 if isinstance(arg, float) else np.int64), hint)
        raise UnsupportedError(f"onnx backend: cannot turn {arg!r} into an ONNX value")

    def scalar_like(self, value, like: fx.Node, hint: str = "const") -> str:
        """A scalar initializer with the dtype of ``like``'s output."""
        val = like.meta.get("val") if isinstance(like, fx.Node) else None
        dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
        return self.init(np.asarray(value), hint, dtype=dtype)

    def const_of(self, arg):
        """The folded constant behind ``arg`` (or ``arg`` itself when it is a literal), else None."""
        if isinstance(arg, fx.Node):
            return self.consts.get(arg.name)
        return arg

    def batch_value(self) -> str:
        """1-D int64 tensor [batch] read from the first tensor input (for dynamic shapes)."""
        if self._batch_value is None:
            first = next(n for n in self.ref.graph.nodes if n.op == "placeholder" and n.name in self.env)
            shape = self.add("Shape", [self.env[first.name]], first, suffix="/batch_shape", start=0, end=1)
            self._batch_value = shape
        return self._batch_value

    def shape_value(self, node: fx.Node, shape) -> str:
        """A 1-D int64 shape for Reshape / Expand / ConstantOfShape; the batch stays symbolic."""
        parts, literal = [], []
        dynamic_lead = self.dynamic and len(shape) > 0 and _is_batch_leading(node, shape, self.batch)
        for i, s in enumerate(shape):
            if isinstance(s, fx.Node):
                if literal:
                    parts.append(self.ints(literal))
                    literal = []
                parts.append(self._sym(s))
            elif i == 0 and dynamic_lead:
                parts.append(self.batch_value())
            else:
                literal.append(int(s))
        if not parts:
            return self.ints(literal, "shape")
        if literal:
            parts.append(self.ints(literal))
        return parts[0] if len(parts) == 1 else self.add("Concat", parts, node, suffix="/shape", axis=0)

    def _sym(self, s: fx.Node) -> str:
        """A symbolic size as a 1-D int64 tensor of one element (cached)."""
        key = ("sym1d", s.name)
        if key not in self.cache:
            self.cache[key] = self.add("Reshape", [self.value(s), self.ints([1])], s, suffix="/as_1d")
        return self.cache[key]

    # -- the walk ---------------------------------------------------------------------------------
    def run(self) -> Emitted:
        for node in self.ref.graph.nodes:
            getattr(self, f"_op_{node.op}")(node)
        return self.out

    def _op_placeholder(self, node: fx.Node):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            self.consts[node.name] = val
            self.out.inputs.append(None)
            return
        name = self.unique(node.name)
        self.env[node.name] = name
        self.out.inputs.append(name)

    def _op_get_attr(self, node: fx.Node):
        self.consts[node.name] = get_attr_value(self.ref, node)

    def _op_call_module(self, node: fx.Node):
        raise UnsupportedError(f"onnx backend: unexpected call_module {where(node)} in a reference graph")

    def _op_call_function(self, node: fx.Node):
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if name in _SKIP:
            return
        if self._foldable(node):
            self.consts[node.name] = _evaluate(node, self.consts)
            return
        entry = self.ops.get(node.target)
        if entry is None:
            raise UnsupportedError(
                f"onnx backend: no ONNX mapping for {where(node)}. Every op must be expressible in ONNX, "
                f"quantized or not: rewrite it with supported ops, or report the op so a mapping can be added.")
        try:
            out = entry.emit(self, node)
            if out is not None:
                self.env[node.name] = out
        except UnsupportedError:
            raise
        except Exception as e:  # noqa: BLE001 - name the node whatever went wrong
            raise UnsupportedError(f"onnx backend: could not emit {where(node)}: {type(e).__name__}: {e}") from e

    def _foldable(self, node: fx.Node) -> bool:
        if node.target in Q_OPS or node.target in DQ_OPS or node.target in LOWBIT_DQ_OPS:
            return False
        deps = node.all_input_nodes
        return all(d.name in self.consts for d in deps) and not any(
            d.op == "placeholder" for d in deps) and bool(deps or _creates_constant(node))

    def _op_output(self, node: fx.Node):
        leaves = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, fx.Node) or leaf.name in self.consts:
                self.out.outputs.append(None)
                self.out.out_template.append(self.consts.get(leaf.name) if isinstance(leaf, fx.Node) else leaf)
                continue
            src = self.env[leaf.name]
            name = self.add("Identity", [src], leaf, suffix=f"/output_{i}")
            self.out.outputs.append(name)
            self.out.out_template.append(None)

    # -- finish -----------------------------------------------------------------------------------
    def model(self, graph_name: str = "qcompile") -> onnx.ModelProto:
        inputs = [self._value_info(n, self.env[n.name]) for n in self.ref.graph.nodes
                  if n.op == "placeholder" and n.name in self.env]
        out_node = next(n for n in self.ref.graph.nodes if n.op == "output")
        leaves = out_node.args[0] if isinstance(out_node.args[0], (list, tuple)) else [out_node.args[0]]
        outputs = [self._value_info(leaf, name) for leaf, name in zip(leaves, self.out.outputs) if name]
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, list(self.inits.values()))
        opsets = [helper.make_opsetid("", self.opset)]
        if any(n.domain == "com.microsoft" for n in self.nodes):
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="qcompile",
                                  producer_version=_version())
        model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
        self.out.model = model
        return model

    def _value_info(self, node: fx.Node, name: str):
        """Graph input / output type; dim 0 is "batch" when dynamic, other symbolic dims keep torch's name."""
        val = node.meta.get("val")
        shape = [int(s) if isinstance(s, int) else str(s) for s in val.shape]
        if self.dynamic and shape and (shape[0] == self.batch or isinstance(shape[0], str)):
            shape[0] = "batch"
        return helper.make_tensor_value_info(name, TORCH_TO_ONNX[val.dtype], shape)


def _is_batch_leading(node: fx.Node, shape, batch) -> bool:
    val = node.meta.get("val")
    return (isinstance(shape[0], int) and shape[0] == batch and isinstance(val, torch.Tensor) and val.dim() > 0
            and val.shape[0] == batch)


def _creates_constant(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", "")
    return name.split(".")[0] in {"arange", "zeros", "ones", "full", "scalar_tensor", "empty", "tensor"}


def _evaluate(node: fx.Node, consts: dict):
    """Run an fx node on folded constants (torch does the arithmetic, so semantics match)."""
    def sub(a):
        if isinstance(a, fx.Node):
            return consts[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        return a
    with torch.no_grad():
        return node.target(*sub(node.args), **{k: sub(v) for k, v in node.kwargs.items()})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("qcompile")
    except PackageNotFoundError:  # pragma: no cover
        return "0"
