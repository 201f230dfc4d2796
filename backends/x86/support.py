"""What the x86 backend runs in int8: a declarative table (op patterns x dtypes x granularity)."""
from __future__ import annotations

import torch

from qcompile.support import ANCHOR, FIXED, PROPAGATE, SHARED, Capabilities, OpSupport
from qcompile.specs import FixedSpec


def _add_check(nodes):
    add = nodes[0]
    if add.kwargs.get("alpha", 1) != 1:
        return "add with alpha != 1"
    return None


def _conv_check(nodes):
    conv = nodes[0]
    val = conv.meta.get("val")
    if val is not None and val.dim() != 4:
        return "only batched 4-D conv2d inputs have int8 kernels"
    return None


def _conv1d_check(nodes):
    val = nodes[0].meta.get("val")
    if val is not None and val.dim() != 3:
        return "only batched 3-D conv1d inputs have int8 kernels"
    return None


def _matmul_check(nodes):
    """Activation x activation (attention Q.K^T, P.V): same rank >= 2 and the same batch dims."""
    mm = nodes[0]
    vals = [a.meta.get("val") if hasattr(a, "meta") else None for a in mm.args[:2]]
    if any(a.op == "get_attr" for a in mm.args[:2] if hasattr(a, "op")):
        return "a constant operand: canonicalized to linear where it is the weight"
    if any(v is None for v in vals):
        return "operand shapes unknown"
    a, b = vals
    if a.dim() < 2 or a.dim() != b.dim() or tuple(a.shape[:-2]) != tuple(b.shape[:-2]):
        return f"int8 batched matmul needs equal batch dims, got {tuple(a.shape)} x {tuple(b.shape)}"
    return None


_SIGMOID = FixedSpec(scale=1.0 / 256.0, zero_point=0)

TABLE = [
    OpSupport("conv2d_relu", ("conv2d", "relu"), ANCHOR, (0,), 1, 2, check=_conv_check),
    OpSupport("conv2d_relu6", ("conv2d", "relu6"), ANCHOR, (0,), 1, 2, check=_conv_check),
    OpSupport("conv2d", ("conv2d",), ANCHOR, (0,), 1, 2, check=_conv_check),
    OpSupport("conv1d_relu", ("conv1d", "relu"), ANCHOR, (0,), 1, 2, check=_conv1d_check),
    OpSupport("conv1d", ("conv1d",), ANCHOR, (0,), 1, 2, check=_conv1d_check),
    OpSupport("linear_relu", ("linear", "relu"), ANCHOR, (0,), 1, 2),
    OpSupport("linear", ("linear",), ANCHOR, (0,), 1, 2),
    OpSupport("matmul", ("matmul",), ANCHOR, (0, 1), check=_matmul_check),
    OpSupport("add_relu", ("add", "relu"), PROPAGATE, (0, 1), check=_add_check),
    OpSupport("add", ("add",), PROPAGATE, (0, 1), check=_add_check),
    OpSupport("mul", ("mul",), PROPAGATE, (0, 1)),
    OpSupport("hardswish", ("hardswish",), PROPAGATE, (0,)),
    OpSupport("relu", ("relu",), SHARED, (0,)),
    OpSupport("relu6", ("relu6",), SHARED, (0,)),
    OpSupport("max_pool2d", ("max_pool2d",), SHARED, (0,)),
    OpSupport("adaptive_avg_pool2d", ("adaptive_avg_pool2d",), SHARED, (0,)),
    OpSupport("avg_pool2d", ("avg_pool2d",), SHARED, (0,)),
    OpSupport("mean", ("mean",), SHARED, (0,)),
    OpSupport("flatten", ("flatten",), SHARED, (0,)),
    OpSupport("reshape", ("reshape",), SHARED, (0,)),
    OpSupport("permute", ("permute",), SHARED, (0,)),
    *[OpSupport(view, (view,), SHARED, (0,)) for view in ("unflatten", "unsqueeze", "squeeze", "select")],
    OpSupport("sigmoid", ("sigmoid",), FIXED, (0,), fixed=_SIGMOID),
    OpSupport("hardsigmoid", ("hardsigmoid",), FIXED, (0,), fixed=_SIGMOID),
]

NOTES = {
    "softmax": "kept float: the x86 int8 softmax loses accuracy and is not faster than float here",
    "layer_norm": "kept float: the x86 int8 layer_norm loses accuracy on residual streams",
    "gelu": "no int8 gelu kernel in PyTorch's quantized CPU ops",
    "embedding": "embeddings are gathers, not GEMMs: int8 static kernels give no speed-up (use weight_only)",
    "batch_norm": "batch-norm that does not follow a conv/linear cannot be folded; no int8 kernel",
    "cat": "no shared-qparams int8 cat in this backend yet",
}
# X86Options.attention="float" (the default): attention runs in fp32 -- SDPA kept fused, activation x activation
# matmuls (an eager attention's Q.K^T and P.V) not annotated. Measured (docs/backends/x86.md): int8 Q.K^T / P.V
# were 1.38-1.41x slower than fp32 attention at d=64, seq 16-64, 1.65x at d=384, seq 512, within 4 % either way
# at d=384, seq 16-256, and 0.1-0.8 dB further from float everywhere.
_ATTENTION_FLOAT = ("kept float: x86 runs attention in fp32 by default (int8 Q.K^T / P.V measured no faster "
                    "here, and less accurate: docs/backends/x86.md); backend_options={'attention': 'int8'} runs "
                    "them int8")
ATTENTION_FLOAT_NOTES = {"matmul": _ATTENTION_FLOAT, "scaled_dot_product_attention": _ATTENTION_FLOAT}
ACT_MATMUL = "matmul"  # the support row of activation x activation matmuls (dropped when attention is float)

CAPABILITIES = Capabilities(
    act_dtypes=("uint8",), act_symmetric=(False, True), act_bits=(8, 7), act_granularities=("per_tensor",),
    weight_bits=(8, 7, 6, 5, 4), weight_symmetric=(True,), weight_granularities=("per_channel", "per_tensor"),
    modes=("static", "qat", "dynamic", "weight_only"), unsupported_notes=NOTES,
)

# -- dynamic and weight-only modes: the claimed op computes in float (lowered by dynamic.py / weight_only.py)
DYNAMIC_TABLE = [
    OpSupport("linear_dynamic", ("linear",), ANCHOR, (0,), 1, 2,
              note="int8 weights; activations quantized at run time"),
]
WEIGHT_ONLY_TABLE = [
    OpSupport("linear_weight_only", ("linear",), ANCHOR, (0,), 1, 2,
              weight_granularities=("per_channel", "per_group", "per_tensor"), note="low-bit weights, fp32 activations"),
    OpSupport("embedding_weight_only", ("embedding",), ANCHOR, (), 0, None,
              weight_granularities=("per_channel", "per_group", "per_tensor"), note="low-bit table, rows dequantized"),
]
_FLOAT_MODE_NOTES = {
    "matmul": "kept float: no batched int8 activation x activation kernel on x86 CPU (torch._int_mm is 2-D)",
    "conv2d": "this mode covers linear layers; use static mode for convolutions",
    "softmax": "float in this mode", "layer_norm": "float in this mode", "gelu": "float in this mode",
}
DYNAMIC_NOTES = {**_FLOAT_MODE_NOTES, "embedding": "embeddings are gathers: use weight_only to shrink them"}
WEIGHT_ONLY_NOTES = dict(_FLOAT_MODE_NOTES)

MODE_CAPABILITIES = {
    "dynamic": Capabilities(
        act_dtypes=("int8", "uint8"), act_symmetric=(True, False), act_bits=(8, 7),
        act_granularities=("per_token", "per_tensor"), weight_bits=(8,), weight_symmetric=(True,),
        weight_granularities=("per_channel", "per_tensor"), modes=CAPABILITIES.modes, unsupported_notes=DYNAMIC_NOTES),
    "weight_only": Capabilities(
        act_dtypes=("float32",), act_granularities=(), weight_bits=(8, 7, 6, 5, 4, 3, 2),
        weight_symmetric=(True, False), weight_granularities=("per_channel", "per_group", "per_tensor"),
        modes=CAPABILITIES.modes, unsupported_notes=WEIGHT_ONLY_NOTES),
}

ACT_DTYPE = torch.uint8
