"""The ONNX QDQ backend: support table -> annotations; reference graph -> ONNX QDQ model on ONNX Runtime.

    art = qcompile.compile(model, (x,), backend="onnx", calibration=loader)
    art.save("model.onnx")   # standard QDQ ONNX, weights stored as int8 inside the file
    y = art(x)               # runs through onnxruntime (CPU EP, all graph optimizations)
    print(art.report)        # what ORT runs in int8 (QLinearConv, QGemm, ...) and what in float

    # no calibration: int8 weights, activations quantized at run time (DynamicQuantizeMatMul)
    art = qcompile.compile(model, (x,), backend="onnx", mode="dynamic")
    # no calibration: int4 group-wise weights, fp32 activations (com.microsoft MatMulNBits)
    art = qcompile.compile(model, (x,), backend="onnx", mode="weight_only",
                           weights=qcompile.WeightSpec(bits=4, group_size=128))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.config import QConfig
from qcompile.errors import ConfigError
from qcompile.passes.annotate import SpecMaker
from qcompile.passes.infra import PassManager
from qcompile.specs import ActivationSpec, QuantSpec, WeightSpec

from ..table import ModeTable, TableBackend
from . import modes, support
from .bias import QuantizeBias
from .emit import EmitOptions
from .lower import OnnxLowered, feeds, flat_inputs, lower

_ACT_DTYPES = {"uint8": torch.uint8, "int8": torch.int8}


@dataclass(frozen=True)
class OnnxOptions:
    """opset: ONNX opset (None: the lowest the graph needs, >= 13 for per-channel QDQ).
    act_dtype: "uint8" (ORT's native U8S8 on x86) or "int8" (ORT rewrites it to uint8 on x86).
    weight_reduce_range: 7-bit weights (ORT's reduce_range, for AVX2 CPUs without VNNI).
    weight_narrow: symmetric int8 weights in [-127, 127] (TensorRT's and ORT's convention) instead of [-128, 127].
    quantize_attention: static mode writes scaled_dot_product_attention out (passes/decompose_sdpa.py) and runs
      activation x activation matmuls int8: Q.K^T as MatMulIntegerToFloat (fp32 scores for the float softmax),
      P.V as QLinearMatMul. False keeps SDPA fused and every such matmul float.
    dynamic_attention: mode="dynamic" also quantizes activation x activation matmuls at run time (ORT fuses
      them into DynamicQuantizeMatMul). Off by default: on MiniLM (seq 128, batch 8) it is no faster (86.0 vs
      83.8 ms) and the min sentence cosine falls from 0.9906 to 0.9895, under the 0.99 bar.
    dynamic_batch: symbolic batch dimension (falls back to the example batch if the graph bakes it in).
    threads: ORT intra-op threads (None: ORT's default).
    parity_sqnr_db: per-layer SQNR (vs the reference graph) below which a layer counts as a drop.
    custom_translation_table: {op overload: onnxscript function} for ops of the user's own that torch.onnx
      cannot translate (passed to ``torch.onnx.export``; docs/backends/onnx.md).
    float_output_linears: static mode: a linear whose consumers are all float (a transformer's output projection
      and second FFN linear feeding the residual add) keeps a float output: DQ -> MatMul without Q, which ORT
      runs as MatMulIntegerToFloat (int8 GEMM, fp32 result) instead of QLinearMatMul + DequantizeLinear
      (passes/float_output.py). A model-output linear (quantize_outputs=False) is that kernel either way.
    quantized_output_convs: static mode: a conv group feeding the model output (quantize_outputs=False) writes int8
      (QLinearConv) and is dequantized, instead of a float Conv on dequantized weights: ORT has no fast int8 conv
      with a float result (ConvInteger measured 6-40x slower than QLinearConv; output_conv.py).
    accuracy_level: mode="weight_only", MatMulNBits' accuracy_level. None: 0 (fp32 activations, matches the
      reference graph) for 2/4-bit weights, 4 (activations quantized to int8 per block inside the kernel) for
      8-bit ones, whose fp32 path ORT-CPU runs ~10x slower than an fp32 MatMul (docs/backends/onnx.md)."""

    opset: int | None = None
    act_dtype: str = "uint8"
    weight_reduce_range: bool = False
    weight_narrow: bool = True
    quantize_attention: bool = True
    dynamic_attention: bool = False
    dynamic_batch: bool = True
    threads: int | None = None
    parity_sqnr_db: float = 25.0
    accuracy_level: int | None = None
    custom_translation_table: dict | None = None
    float_output_linears: bool = True
    quantized_output_convs: bool = True

    def __post_init__(self):
        if self.act_dtype not in _ACT_DTYPES:
            raise ConfigError(f"onnx backend: act_dtype must be one of {list(_ACT_DTYPES)}, got {self.act_dtype!r}")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise ConfigError(f"onnx backend: accuracy_level must be None or 0..4 (MatMulNBits), "
                              f"got {self.accuracy_level!r}")


class OnnxBackend(TableBackend):
    name = "onnx"
    Options = OnnxOptions
    file_extensions = (".onnx",)
    static_notes = support.NOTES
    mode_capabilities = {"static": support.CAPABILITIES, **support.MODE_CAPABILITIES}

    def check_options(self) -> None:
        self._table = support.table(_ACT_DTYPES[self.options.act_dtype], self.options.quantize_attention)

    # -- what the backend supports (data for TableBackend) ------------------------------------------
    def is_available(self):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "onnxruntime is not installed: pip install onnxruntime (or pip install 'qcompile[onnx]')"
        try:
            import onnx  # noqa: F401
        except ImportError:
            return False, "onnx is not installed: pip install onnx"
        return True, ""

    def support_table(self):
        return self._table

    def extra_passes(self, config, mode: str) -> tuple[list, list]:
        if mode in ("dynamic", "weight_only"):
            return [], []
        from qcompile.passes.decompose_sdpa import DecomposeSDPA
        from qcompile.passes.float_output import FloatOutputLinears

        from .output_conv import QuantizedOutputConvs
        convs = [QuantizedOutputConvs()] if self.options.quantized_output_convs else []
        if not self.options.quantize_attention:
            return [], convs + [FloatOutputLinears(self.options.float_output_linears)]
        # attention written out as matmul / softmax / matmul, so Q.K^T and P.V run as QDQ MatMuls (ORT: QLinearMatMul,
        # or MatMulIntegerToFloat for Q.K^T whose consumers - scale, mask, softmax - are float)
        return [DecomposeSDPA()], convs + [FloatOutputLinears(self.options.float_output_linears, matmuls=True)]

    def float_mode_table(self, mode: str) -> ModeTable:
        """dynamic / weight_only: the claimed linears (embeddings) compute and return float (see modes.py)."""
        o = self.options
        if mode == "weight_only":
            return ModeTable(support.WEIGHT_ONLY_TABLE, support.WEIGHT_ONLY_NOTES,
                             SpecMaker(lambda a: None, modes.weight_only_spec))
        table, notes = support.DYNAMIC_TABLE, dict(support.DYNAMIC_NOTES)
        if not o.dynamic_attention:
            table = [r for r in table if r.name != "matmul_dynamic"]
            notes["matmul"] = ("kept float: activation x activation matmul (attention); "
                               "backend_options={'dynamic_attention': True} quantizes it at run time")
        return ModeTable(table, notes, SpecMaker(modes.dynamic_act_spec, lambda w, row, node: modes.dynamic_weight_spec(
            w, row, node, narrow=o.weight_narrow, reduce_range=o.weight_reduce_range)))

    def default_config(self, mode: str) -> QConfig:
        weights = WeightSpec(bits=8, granularity="per_channel", symmetric=True)
        if mode == "dynamic":  # DynamicQuantizeLinear: uint8 per tensor, affine
            return QConfig(weights=weights, activations=ActivationSpec(granularity="per_tensor", symmetric=False))
        if mode == "weight_only":
            return QConfig(weights=weights)
        return QConfig(weights=weights, activations=ActivationSpec(observer="mse"))

    def act_spec(self, a: ActivationSpec) -> QuantSpec:
        return QuantSpec(dtype=_ACT_DTYPES[self.options.act_dtype], bits=a.bits, symmetric=a.symmetric,
                         observer=a.observer, percentile=a.percentile)

    def weight_spec(self, w: WeightSpec, row, node) -> QuantSpec:
        gran = w.granularity if w.granularity in row.weight_granularities else "per_tensor"
        # output channels: axis 1 for ConvTranspose ([Cin, Cout/g, k, k]) and for an embedding table's
        # hidden columns (the gathered rows keep them), axis 0 otherwise
        axis = (1 if row.ops[0] in ("conv_transpose2d", "embedding") else 0) if gran == "per_channel" else None
        return QuantSpec(dtype=torch.int8, bits=w.bits, symmetric=True, narrow=self.options.weight_narrow,
                         reduce_range=self.options.weight_reduce_range, granularity=gran, axis=axis,
                         observer=w.observer)

    # -- lowering and running ---------------------------------------------------------------------
    def emit_options(self) -> EmitOptions:
        o = self.options
        return EmitOptions(opset=o.opset, dynamic_batch=o.dynamic_batch, accuracy_level=o.accuracy_level)

    def lower_passes(self) -> list:
        """Passes on the reference graph before emission (in place: the reference then states exactly
        what the emitted model computes)."""
        return [QuantizeBias()]

    def lower(self, reference, example_inputs, mode: str) -> OnnxLowered:
        PassManager(self.lower_passes())(reference)
        return lower(reference, tuple(example_inputs.args), dict(example_inputs.kwargs), self.emit_options(),
                     self.options.threads, self.options.custom_translation_table)

    def runtime_name(self) -> str:
        from .runtime import ort_version
        return f"onnxruntime-CPU {ort_version()}"

    def run(self, lowered: OnnxLowered, args, kwargs):
        flat = flat_inputs(args, kwargs)
        outs = iter(lowered.session.run(None, feeds(lowered.emitted, flat)))
        leaves = [torch.from_numpy(next(outs)) if name is not None else const
                  for name, const in zip(lowered.emitted.outputs, lowered.emitted.out_template)]
        if lowered.out_spec is None:
            return leaves[0] if len(leaves) == 1 else tuple(leaves)
        return torch.utils._pytree.tree_unflatten(leaves, lowered.out_spec)

    # -- persistence and verification -------------------------------------------------------------
    def save(self, artifact, path: str) -> None:
        """Write one self-contained .onnx file (int8 initializers inside, no external data), with the
        backend options and the report summary as model metadata."""
        import json

        import onnx
        model = onnx.ModelProto()
        model.CopyFrom(artifact.lowered.model)
        if model.ByteSize() > 2**31 - 1:
            raise ConfigError("onnx backend: the model exceeds protobuf's 2 GB limit; external data is not "
                              "supported (the file must be self-contained)")
        onnx.helper.set_model_props(model, {
            "qcompile.backend_options": json.dumps(_jsonable(self.options.__dict__)),
            "qcompile.report_summary": json.dumps(artifact.report.summary(), default=str)})
        onnx.save_model(model, path, save_as_external_data=False)

    def verify_runtime(self, artifact, mode: str) -> dict:
        from .verify import layer_parity, summarize
        low: OnnxLowered = artifact.lowered
        flat = flat_inputs(artifact.example_inputs.args, artifact.example_inputs.kwargs)
        rg = low.runtime
        if low.emitted.quantized:
            parity = layer_parity(artifact.reference, low.emitted, flat, self.options.parity_sqnr_db,
                                  self.options.threads)
        else:  # dynamic / weight-only: no fixed-parameter QuantizeLinear to probe (the model output is compared)
            parity = {"layers": [], "first_drop": None, "probe_int_ops": _kernels(rg.int_ops)}
        out = summarize(parity, self.options.parity_sqnr_db)
        out.update({
            "onnx_opset": low.emitted.opset, "dynamic_batch": low.emitted.dynamic_batch,
            "ort_int8_ops": dict(rg.int_ops), "ort_float_ops": dict(rg.float_ops),
            "ort_int8_op_count": sum(rg.int_ops.values()), "ort_float_op_count": sum(rg.float_ops.values()),
            "ort_float_between_qdq": list(rg.float_between_qdq), "ort_unmapped_ops": dict(rg.unmapped),
            "probe_matches_session": parity["probe_int_ops"] == _kernels(rg.int_ops),
            "onnx_file_bytes": low.model.ByteSize(), "notes": list(low.notes),
        })
        return out


def _kernels(ops) -> dict:
    from .runtime import INT_KERNELS
    return {k: v for k, v in ops.items() if k in INT_KERNELS}


def _jsonable(options: dict) -> dict:
    table = options.get("custom_translation_table")
    return {**options, "custom_translation_table": sorted(str(op) for op in table) if table else None}
