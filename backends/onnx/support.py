"""What the ONNX QDQ backend quantizes: the groups ONNX Runtime's CPU EP turns into integer kernels.

Source: ORT's QDQ selector/action registry (``qdq_selector_action_transformer.cc``) and selectors
(``qdq_selectors.cc``), CPU EP:

* Conv (+ a Relu / Clip made redundant by the output Q)   -> QLinearConv (bias must be int32 via DQ)
* Gemm (+ Relu / Clip)                                    -> QGemm (bias int32; output Q optional)
* MatMul with output Q -> QLinearMatMul; without         -> MatMulIntegerToFloat
* Add / Mul (+ Relu)                                      -> QLinearAdd / QLinearMul
* AveragePool / GlobalAveragePool / Sigmoid / Softmax / LeakyRelu -> QLinear* (own output params)
* MaxPool / Reshape / Flatten / Transpose / Squeeze / Unsqueeze / Slice / Gather / Expand
                                                          -> Q/DQ dropped when both share params
* Concat -> QLinearConcat, Where -> QLinearWhere
On x86 ``QDQIsInt8Allowed()`` is false: int8 activations are rewritten to uint8 (QDQS8ToU8) before
fusion, so uint8 activations with int8 weights (U8S8) are the native scheme.

Everything else (HardSwish, HardSigmoid, Gelu, LayerNormalization, a standalone Relu, ConvTranspose,
ReduceMean over other axes...) runs in float between DequantizeLinear and QuantizeLinear on ORT-CPU.
ConvTranspose stays in the table: its QDQ form is valid ONNX that TensorRT / OpenVINO / QNN run in int8;
the runtime check reports it as float on onnxruntime-CPU.
"""
from __future__ import annotations

import torch

from qcompile.support import ANCHOR, FIXED, PROPAGATE, SHARED, Capabilities, OpSupport
from qcompile.ops import op_kind
from qcompile.specs import FixedSpec


# ops whose ONNX form ORT runs in float: an int8 value feeding only these is dequantized right away
_FLOAT_CONSUMERS = {"layer_norm", "gelu", "hardswish", "hardsigmoid", "batch_norm"}


def _feeds_float_only(nodes) -> str | None:
    users = list(nodes[-1].users)
    if users and all(op_kind(u) in _FLOAT_CONSUMERS for u in users):
        kinds = sorted({op_kind(u) for u in users})
        return (f"kept float: it only feeds {', '.join(kinds)}, which ORT runs in float (a uint8 output would be "
                f"dequantized right away, and float keeps the residual stream exact)")
    return None


def _add_check(nodes):
    if nodes[0].kwargs.get("alpha", 1) != 1:
        return "add with alpha != 1"
    return _feeds_float_only(nodes)


def _val(node):
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None


def _matmul_check(nodes):
    a, b = (_val(x) for x in nodes[0].args[:2])
    if a is None or b is None or a.dim() < 2 or b.dim() < 2:
        return "QLinearMatMul needs inputs of rank >= 2"
    return None


def _mean_check(nodes):
    node = nodes[0]
    val = _val(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else None
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if val is None or val.dim() != 4 or not keep or sorted(d % 4 for d in (dims or [])) != [2, 3]:
        return "only a keep-dim mean over H, W of a 4-D tensor maps to QLinearGlobalAveragePool"
    return None


def _adaptive_check(nodes):
    node = nodes[0]
    val, out = _val(node.args[0]), list(node.args[1])
    if val is None or all(o == 1 for o in out):
        return None
    if any(s % o for s, o in zip(val.shape[2:], out)):
        return "adaptive pooling that is not an even split has no AveragePool form"
    return None


def fixed_spec(act_dtype: torch.dtype) -> FixedSpec:
    """[0, 1) outputs (sigmoid, softmax): scale 1/256 and the zero point at the bottom of the range."""
    if act_dtype == torch.int8:
        return FixedSpec(scale=1.0 / 256.0, zero_point=-128, dtype=torch.int8, quant_min=-128, quant_max=127)
    return FixedSpec(scale=1.0 / 256.0, zero_point=0)


def table(act_dtype: torch.dtype = torch.uint8, quantize_attention: bool = True) -> list[OpSupport]:
    fixed = fixed_spec(act_dtype)
    rows = [
        OpSupport("conv2d_relu", ("conv2d", "relu"), ANCHOR, (0,), 1, 2, note="QLinearConv (Relu folded)"),
        OpSupport("conv2d_relu6", ("conv2d", "relu6"), ANCHOR, (0,), 1, 2, note="QLinearConv (Clip folded)"),
        OpSupport("conv2d", ("conv2d",), ANCHOR, (0,), 1, 2),
        OpSupport("conv1d_relu", ("conv1d", "relu"), ANCHOR, (0,), 1, 2),
        OpSupport("conv1d", ("conv1d",), ANCHOR, (0,), 1, 2),
        OpSupport("conv_transpose2d", ("conv_transpose2d",), ANCHOR, (0,), 1, 2,
                  note="QDQ ConvTranspose: int8 on TensorRT/OpenVINO/QNN, float on ORT-CPU"),
        OpSupport("linear_relu", ("linear", "relu"), ANCHOR, (0,), 1, 2),
        OpSupport("linear", ("linear",), ANCHOR, (0,), 1, 2),
        OpSupport("add_relu", ("add", "relu"), PROPAGATE, (0, 1), check=_add_check),
        OpSupport("add", ("add",), PROPAGATE, (0, 1), check=_add_check),
        OpSupport("mul", ("mul",), PROPAGATE, (0, 1), check=_feeds_float_only),
        OpSupport("adaptive_avg_pool2d", ("adaptive_avg_pool2d",), PROPAGATE, (0,), check=_adaptive_check),
        OpSupport("avg_pool2d", ("avg_pool2d",), PROPAGATE, (0,)),
        OpSupport("mean", ("mean",), PROPAGATE, (0,), check=_mean_check),
        OpSupport("max_pool2d", ("max_pool2d",), SHARED, (0,)),
        OpSupport("flatten", ("flatten",), SHARED, (0,)),
        OpSupport("reshape", ("reshape",), SHARED, (0,)),
        OpSupport("permute", ("permute",), SHARED, (0,)),
        OpSupport("embedding", ("embedding",), ANCHOR, (), 0, weight_granularities=("per_channel", "per_tensor"),
                  note="int8 table (per hidden column), gathered before dequantizing"),
        OpSupport("sigmoid", ("sigmoid",), FIXED, (0,), fixed=fixed),
        OpSupport("softmax", ("softmax",), FIXED, (0,), fixed=fixed),
    ]
    if quantize_attention:
        rows.append(OpSupport("matmul", ("matmul",), ANCHOR, (0, 1), check=_matmul_check,
                              note="QLinearMatMul (activation x activation)"))
    return rows


NOTES = {
    "hardswish": "kept float: ORT's CPU EP has no QDQ fusion for HardSwish",
    "hardsigmoid": "kept float: ORT's CPU EP has no QDQ fusion for HardSigmoid",
    "gelu": "kept float: ORT's CPU EP has no QDQ fusion for Gelu",
    "layer_norm": "kept float: ORT's CPU EP has no QDQ fusion for LayerNormalization",
    "relu": "kept float: ORT folds a Relu only into the Conv/Gemm/Add before it (no standalone int8 Relu)",
    "relu6": "kept float: ORT folds a Clip only into the Conv/Gemm before it",
    "cat": "kept float: the annotator has no list-input (Concat) pattern yet",
    "matmul": "kept float: activation x activation matmul (quantize_attention=False)",
    "batch_norm": "batch-norm that does not follow a conv/linear cannot be folded; no QDQ fusion",
    "dropout": "eval-mode dropout is removed",
}

CAPABILITIES = Capabilities(
    act_dtypes=("uint8", "int8"), act_symmetric=(False, True), act_bits=(8,), act_granularities=("per_tensor",),
    weight_bits=(8, 7, 6, 5, 4, 3, 2), weight_symmetric=(True,), weight_granularities=("per_channel", "per_tensor"),
    modes=("static", "dynamic", "weight_only"), unsupported_notes=NOTES,
)


# -- dynamic and weight-only modes (``modes.py``: specs; ``prepare.py`` + ``custom_ops.py``: emission) ---
# The claimed linear computes and returns float; what ORT runs for it (measured, ORT 1.32 CPU EP):
# * dynamic: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale) -> Add(bias), the form
#   ORT's own quantize_dynamic writes. ORT fuses it into DynamicQuantizeMatMul (one reader of x) or keeps one
#   DynamicQuantizeLinear and fuses each reader into MatMulIntegerToFloat (Q / K / V), bias folded in, for
#   2-D and N-D inputs. The QDQ spelling (DynamicQuantizeLinear -> DequantizeLinear -> MatMul) fuses only for
#   N-D inputs: on 2-D ones ORT's MatMulAddFusion turns MatMul + Add into a float Gemm first.
# * weight_only: com.microsoft MatMulNBits (2 / 4 / 8-bit blocks of 16..256 along K, fp32 scales, packed
#   zero points); NF4 -> com.microsoft MatMulBnb4; embedding tables: Gather on int8 rows, then the row scales.
DYNAMIC_TABLE = [
    OpSupport("linear_dynamic", ("linear",), ANCHOR, (0,), 1, 2,
              note="int8 weights; uint8 activations quantized at run time (DynamicQuantizeLinear)"),
    OpSupport("matmul_dynamic", ("matmul",), ANCHOR, (0, 1),
              note="both activations quantized at run time (DynamicQuantizeLinear), integer matmul"),
]
WEIGHT_ONLY_TABLE = [
    OpSupport("linear_weight_only", ("linear",), ANCHOR, (0,), 1, 2,
              weight_granularities=("per_channel", "per_group", "per_tensor"),
              note="low-bit weights (MatMulNBits / MatMulBnb4), fp32 activations"),
    OpSupport("embedding_weight_only", ("embedding",), ANCHOR, (), 0, None,
              weight_granularities=("per_channel", "per_group", "per_tensor"),
              note="int8 table rows gathered, then scaled"),
]
_FLOAT_MODE_NOTES = {
    "matmul": "kept float: activation x activation matmul (attention); these modes quantize linear weights "
              "(static mode runs it as QLinearMatMul)",
    "conv2d": "this mode covers linear layers; use static mode for convolutions (QLinearConv)",
    "conv1d": "this mode covers linear layers; use static mode for convolutions (QLinearConv)",
    "softmax": "float in this mode", "layer_norm": "float in this mode (LayerNormalization)",
    "gelu": "float in this mode (Gelu)",
}
DYNAMIC_NOTES = {**_FLOAT_MODE_NOTES,
                 "embedding": "kept float: an embedding is a gather, not a GEMM (mode='weight_only' shrinks it)"}
WEIGHT_ONLY_NOTES = dict(_FLOAT_MODE_NOTES)

MODE_CAPABILITIES = {
    "dynamic": Capabilities(
        act_dtypes=("uint8",), act_symmetric=(False,), act_bits=(8,), act_granularities=("per_tensor",),
        weight_bits=(8,), weight_symmetric=(True,), weight_granularities=("per_channel", "per_tensor"),
        modes=("static", "dynamic", "weight_only"), unsupported_notes=DYNAMIC_NOTES),
    "weight_only": Capabilities(
        act_dtypes=("float32",), act_granularities=(), weight_bits=(8, 7, 6, 5, 4, 3, 2),
        weight_symmetric=(True, False), weight_granularities=("per_channel", "per_group", "per_tensor"),
        modes=("static", "dynamic", "weight_only"), unsupported_notes=WEIGHT_ONLY_NOTES),
}
