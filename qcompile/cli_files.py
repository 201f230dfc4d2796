"""Saved artifacts for the CLI: ``.qc`` through :func:`qcompile.load`; ``.onnx`` (protobuf) and ``.pte``
(flatbuffer) read and run directly in their runtimes. Loading never unpickles."""
from __future__ import annotations

import json
import os
from collections import Counter

import torch

from .errors import InputError
from .textfmt import human_bytes, table

ONNX_INT_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulNBits",
                "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearAveragePool", "MatMulBnb4")


def _check(path: str) -> str:
    if not os.path.isfile(path):
        raise InputError(f"no such file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".qc", ".onnx", ".pte"):
        raise InputError(f"{path}: expected a .qc, .onnx or .pte file written by qcompile")
    return ext


class OnnxFile:
    """Runs a .onnx file in ONNX Runtime with the model's positional inputs."""

    def __init__(self, path: str):
        import onnxruntime as ort
        self.path = path
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args, **kwargs):
        flat = list(args) + [kwargs[k] for k in kwargs]
        feeds = {n: t.detach().contiguous().numpy() for n, t in zip(self.inputs, flat)}
        outs = self.session.run(None, feeds)
        return torch.from_numpy(outs[0]) if len(outs) == 1 else tuple(torch.from_numpy(o) for o in outs)

    def runtime_name(self) -> str:
        import onnxruntime as ort
        return f"onnxruntime-CPU {ort.__version__}"


class PteFile:
    """Runs a .pte program in ExecuTorch's runtime (positional tensor inputs, contiguous)."""

    def __init__(self, path: str):
        from executorch.runtime import Runtime
        with open(path, "rb") as f:
            self.buffer = f.read()  # kept alive: the runtime reads from it
        self.program = Runtime.get().load_program(self.buffer)
        self.method = self.program.load_method("forward")

    def __call__(self, *args, **kwargs):
        outs = self.method.execute([a.contiguous() for a in list(args) + list(kwargs.values())])
        return outs[0] if len(outs) == 1 else tuple(outs)

    def runtime_name(self) -> str:
        try:
            from executorch.version import __version__ as v
        except ImportError:
            v = "?"
        return f"ExecuTorch {v}"


class _Runner:
    """Gives a file runner the ``backend.runtime_name()`` that evaluate reads."""

    def __init__(self, fn, path: str):
        self.fn, self.backend, self.file_bytes = fn, fn, os.path.getsize(path)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def open_artifact(path: str):
    """A callable for ``evaluate``: an Artifact for .qc, an ONNX Runtime / ExecuTorch runner otherwise."""
    ext = _check(path)
    if ext == ".qc":
        from .loading import load
        return load(path)
    return _Runner(OnnxFile(path) if ext == ".onnx" else PteFile(path), path)


# -- inspect --------------------------------------------------------------------------------------------
def inspect_text(path: str) -> str:
    ext = _check(path)
    head = f"{path}: {human_bytes(os.path.getsize(path))}"
    if ext == ".qc":
        from .loading import load
        return f"{head}, qcompile artifact\n{load(path).report}"
    return head + "\n" + (_inspect_onnx(path) if ext == ".onnx" else _inspect_pte(path))


def _shape(vi) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _inspect_onnx(path: str) -> str:
    import onnx
    model = onnx.load(path, load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    ops = Counter(n.op_type for n in model.graph.node)
    int_ops = {k: v for k, v in ops.items() if k in ONNX_INT_OPS}
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    lines = [f"ONNX model, opset {opsets}, "
             f"producer {model.producer_name} {model.producer_version}",
             "inputs:  " + ", ".join(f"{i.name} {_shape(i)}" for i in model.graph.input),
             "outputs: " + ", ".join(f"{o.name} {_shape(o)}" for o in model.graph.output),
             f"nodes in the file: {sum(ops.values())}; integer ops in the file: {sum(int_ops.values())} "
             f"({', '.join(f'{k} x{v}' for k, v in sorted(int_ops.items())) or 'none: QDQ form'})",
             f"initializers: {len(model.graph.initializer)}, " + ", ".join(
                 f"{k}: {human_bytes(v)}" for k, v in _initializer_bytes(model).items())]
    lines.append(_ort_kernels(path))
    if "qcompile.report_summary" in props:
        s = json.loads(props["qcompile.report_summary"])
        lines.append("qcompile report: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    lines.append(table(["op", "count"], [[k, v] for k, v in ops.most_common()]))
    return "\n".join(lines)


def _ort_kernels(path: str) -> str:
    """The integer kernels ONNX Runtime runs after its graph optimizations (QDQ groups fused)."""
    import tempfile

    import onnx
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime not installed: cannot say which kernels run"
    with tempfile.TemporaryDirectory() as d:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # no warning that the optimized file is machine-specific: it is deleted
        opts.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    ints = {k: v for k, v in ops.items() if k in ONNX_INT_OPS}
    return (f"ONNX Runtime ({ort.__version__}) runs {sum(ints.values())} integer kernel(s): "
            + (", ".join(f"{k} x{v}" for k, v in sorted(ints.items())) or "none")
            + f"; float ops left: {sum(v for k, v in ops.items() if k not in ints and 'Quantize' not in k)}")


def _initializer_bytes(model) -> dict:
    from onnx import helper
    out = Counter()
    for t in model.graph.initializer:
        out[helper.tensor_dtype_to_np_dtype(t.data_type).name] += len(t.raw_data) or 0
    return dict(out)


_ET_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64",
              11: "bool", 15: "bfloat16"}  # ExecuTorch ScalarType codes


def _inspect_pte(path: str) -> str:
    runner = PteFile(path)
    meta = runner.method.metadata
    lines = [f"ExecuTorch program ({runner.runtime_name()}), methods: {', '.join(runner.program.method_names)}"]
    ins = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]
    outs = [meta.output_tensor_meta(i) for i in range(meta.num_outputs())]
    lines.append("inputs:  " + ", ".join(f"{list(m.sizes())} {_ET_DTYPES.get(int(m.dtype()), m.dtype())}" for m in ins))
    lines.append("outputs: " + ", ".join(f"{list(m.sizes())} {_ET_DTYPES.get(int(m.dtype()), m.dtype())}" for m in outs))
    try:
        from executorch.exir._serialize._program import deserialize_pte_binary
        plan = deserialize_pte_binary(runner.buffer).program.execution_plan[0]
        delegates = Counter(d.id for d in plan.delegates)
        ops = Counter(op.name for op in plan.operators)
        lines.append(f"delegates: {', '.join(f'{k} x{v}' for k, v in delegates.items()) or 'none'}; "
                     f"operators outside delegates: {', '.join(sorted(ops)) or 'none'}")
    except Exception as e:  # noqa: BLE001 - the flatbuffer schema of another ExecuTorch version
        lines.append(f"delegates: unknown ({type(e).__name__})")
    return "\n".join(lines)
