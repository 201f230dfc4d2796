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
# X86Options.attention: "auto" (the default) runs an attention's Q.K^T and P.V in int8 where that is faster --
# the AVX-512 VNNI batched kernel is built and each head's product is at least INT8_ATTENTION_MIN_MACS
# (Lq x d x Lk, 128 x 64 x 128) -- and in fp32 elsewhere; "float" always fp32; "int8" always int8. Measured on
# the Zen 4 (docs/backends/x86.md), two encoder layers, int8 / fp32 attention latency: 1.29 at d=64 seq 16,
# 1.14 at d=384 seq 32 (heads of 64), 0.92 at seq 128, 0.91 at seq 256, 0.89 at seq 512; int8
# attention was 0.1-0.8 dB further from float on every shape. Without the VNNI kernel torch._int_mm runs per
# batch slice, slower than dynamic int8 on the d=384 encoder: fp32 there.
INT8_ATTENTION_MIN_MACS = 128 * 64 * 128
_ATTENTION_FLOAT = ("kept float: backend_options={'attention': 'float'} asks for fp32 attention (int8 Q.K^T / P.V "
                    "are 0.1-0.8 dB further from float and faster only on long sequences: docs/backends/x86.md)")
_ATTENTION_AUTO = ("kept float: x86 runs attention in int8 only where that measured faster (the AVX-512 VNNI "
                   "batched kernel, and at least 128 x 64 x 128 multiply-adds per head; docs/backends/x86.md), "
                   "fp32 elsewhere; backend_options={'attention': 'int8'} forces int8")
ATTENTION_NOTES = {
    "float": {"matmul": _ATTENTION_FLOAT, "scaled_dot_product_attention": _ATTENTION_FLOAT},
    "auto": {"matmul": _ATTENTION_AUTO, "scaled_dot_product_attention": _ATTENTION_AUTO},
    "int8": {},
}


def attention_too_small(m: int, k: int, n: int) -> str | None:
    """attention="auto": why an attention product [m, k] x [k, n] per head stays fp32, or None for int8."""
    from qcompile.kernels import u8_bmm_available
    if not u8_bmm_available():
        return "no AVX-512 VNNI batched int8 kernel on this CPU / build (torch._int_mm per slice is slower)"
    if not all(isinstance(d, int) for d in (m, k, n)):  # a sequence length left dynamic by capture
        return f"the product's size ({m} x {k} x {n}) is not fixed at compile time"
    if m * k * n < INT8_ATTENTION_MIN_MACS:
        return f"{m} x {k} x {n} multiply-adds per head, below 128 x 64 x 128"
    return None


def sdpa_too_small(q, k, v) -> str | None:
    """DecomposeSDPA's ``keep`` for attention="auto": Q.K^T is [Lq, d] x [d, Lk] per head."""
    return attention_too_small(q.shape[-2], q.shape[-1], k.shape[-2])


def matmul_auto_check(nodes):
    """_matmul_check, and for attention="auto" the size / kernel rule."""
    reason = _matmul_check(nodes)
    if reason is not None:
        return reason
    a, b = (x.meta["val"] for x in nodes[0].args[:2])
    detail = attention_too_small(a.shape[-2], a.shape[-1], b.shape[-1])
    return None if detail is None else f"{_ATTENTION_AUTO} ({detail})"


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
