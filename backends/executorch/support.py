"""What XNNPACK (through ExecuTorch) runs in int8: a declarative table with the recorded "why not".

Derived from ExecuTorch 1.5.1's XNNPACK partitioner configs
(``executorch/backends/xnnpack/partition/config/{gemm,generic_node}_configs.py``): an op is listed
here only if its config declares ``ConfigPrecisionType.STATIC_QUANT`` and the check below mirrors
the config's ``check_constraints`` (so annotation never quantizes a node the partitioner would
decline). Everything else stays float with the reason in ``NOTES``; after lowering, the backend
reads back what the partitioner actually did (``verify.py``), so a mismatch is reported per node.

Numerics follow ExecuTorch's own ``XNNPACKQuantizer`` (``get_symmetric_quantization_config``):
activations int8 affine in [-128, 127] per tensor; weights int8 symmetric in the narrow range
[-127, 127] (zero point 0, what XNNPACK's qs8/qc8 kernels require), per output channel (axis 0)
or per tensor; bias float (XNNPACK requantizes it to int32 with input scale x weight scale).

Weights of 4..7 bits are symmetric in the full range [-2**(b-1), 2**(b-1) - 1]. XNNPACK has no static
low-bit convolution, so conv weights keep their codes in int8 (its qc8 / qs8 kernels run them exactly);
a 4-bit per-channel or per-tensor linear with an even number of input features is stored packed two
codes per byte (XNNPACK's qs8 x qc4w fully-connected kernel). See ``lower.weight_containers``.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile.support import ANCHOR, PROPAGATE, SHARED, Capabilities, OpSupport
from qcompile.specs import FixedSpec


def _pair(value, default):
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return list(default)
    if isinstance(value, int):
        return [value, value]
    value = list(value)
    return [value[0], value[0]] if len(value) == 1 else value[:2]


def _rank(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.dim() if hasattr(val, "dim") else -1


def _conv_check(nodes):
    """ConvolutionConfig: 1-D and 2-D convolutions only; no transposed conv in this table."""
    weight = nodes[0].args[1]
    w = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    if w is not None and w.dim() - 2 > 2:
        return "XNNPACK runs only 1-D and 2-D convolutions"
    return None


def _add_check(nodes):
    """AddConfig: alpha must be 1; both operands must be tensors (a scalar add is not a quantized add)."""
    add = nodes[0]
    if add.kwargs.get("alpha", 1) != 1:
        return "XNNPACK's add does not support alpha != 1"
    if not all(isinstance(a, fx.Node) for a in add.args[:2]):
        return "adding a Python scalar: XNNPACK's int8 add needs two tensors"
    return None


def _mul_check(nodes):
    if not all(isinstance(a, fx.Node) for a in nodes[0].args[:2]):
        return "multiplying by a Python scalar: XNNPACK's int8 multiply needs two tensors"
    return None


def _max_pool_check(nodes):
    """MaxPool2dConfig: stride <= kernel size; ceil mode needs static shapes (we export static)."""
    node = nodes[0]
    kernel = _pair(node.args[1] if len(node.args) > 1 else None, [1, 1])
    stride = _pair(node.args[2] if len(node.args) > 2 else None, kernel)
    if stride[0] > kernel[0] or stride[1] > kernel[1]:
        return f"XNNPACK's max_pool2d needs stride {stride} <= kernel size {kernel}"
    return None


def _mean_check(nodes):
    """MeanDimConfig: a 4-D input averaged over dims (2, 3) with keepdim=True (global average pool)."""
    node = nodes[0]
    rank = _rank(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else None
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    if rank != 4 or sorted(d % 4 for d in dims) != [2, 3]:
        return "XNNPACK's int8 mean is a global average pool: 4-D input, dims (2, 3) only"
    if not keepdim or node.kwargs.get("dtype") is not None:
        return "XNNPACK's int8 mean needs keepdim=True and no dtype override"
    return None


def _adaptive_pool_check(nodes):
    """adaptive_avg_pool2d(1) becomes mean.dim([-1, -2], keepdim=True) in ExecuTorch's edge dialect."""
    node = nodes[0]
    if _rank(node.args[0]) != 4 or _pair(node.args[1], [1, 1]) != [1, 1]:
        return "only a 4-D adaptive_avg_pool2d to 1x1 becomes XNNPACK's global average pool"
    return None


def _reshape_check(nodes):
    """ViewCopyConfig: at most one inferred (-1) dimension (shapes are static after export)."""
    shape = nodes[0].args[1] if len(nodes[0].args) > 1 else []
    if isinstance(shape, (list, tuple)) and sum(1 for d in shape if isinstance(d, int) and d == -1) > 1:
        return "XNNPACK's reshape supports a single inferred dimension"
    return None


def _weighted(name, ops):
    return OpSupport(name, ops, ANCHOR, (0,), 1, 2, check=_conv_check if ops[0].startswith("conv") else None)


# The [0, 1] gate FoldHardsigmoid makes: int8 codes -128..127 cover exactly [0, 1] (an observer would
# fit the calibration's narrower range and clip gates the calibration did not reach).
GATE = FixedSpec(scale=1.0 / 255.0, zero_point=-128, dtype=torch.int8, quant_min=-128, quant_max=127)


def _gate_check(nodes):
    if tuple(nodes[-1].args[1:3]) != (0.0, 1.0):
        return "not a [0, 1] gate"
    return _conv_check(nodes) if nodes[0].target != torch.ops.aten.linear.default else None


def _gate(op):
    return OpSupport(f"{op}_gate", (op, "hardtanh"), ANCHOR, (0,), 1, 2, check=_gate_check, fixed=GATE)


TABLE = [
    # conv / linear -> hardtanh(0, 1) (FoldHardsigmoid's squeeze-excite gate): fixed [0, 1] output
    *(_gate(op) for op in ("conv2d", "conv1d", "linear")),
    # ConvolutionConfig / LinearConfig: fused_acts = relu, hardtanh with any bounds (relu6 is
    # hardtanh(0, 6); FoldHardsigmoid makes a squeeze-excite gate conv -> hardtanh(0, 1)).
    *(_weighted(f"{op}{tail}", (op, *acts)) for op in ("conv2d", "conv1d", "linear")
      for tail, acts in (("_relu", ("relu",)), ("_relu6", ("relu6",)), ("_hardtanh", ("hardtanh",)), ("", ()))),
    # AddConfig: fused_act = relu. MulConfig: no fused activation.
    OpSupport("add_relu", ("add", "relu"), PROPAGATE, (0, 1), check=_add_check),
    OpSupport("add", ("add",), PROPAGATE, (0, 1), check=_add_check),
    OpSupport("mul", ("mul",), PROPAGATE, (0, 1), check=_mul_check),
    # Clamp-like and data-movement ops keep their input's parameters (XNNPACKQuantizer's
    # "share observer" ops); XNNPACK runs them on int8 tensors.
    OpSupport("relu", ("relu",), SHARED, (0,)),
    OpSupport("relu6", ("relu6",), SHARED, (0,)),
    OpSupport("hardtanh", ("hardtanh",), SHARED, (0,)),
    OpSupport("max_pool2d", ("max_pool2d",), SHARED, (0,), check=_max_pool_check),
    OpSupport("adaptive_avg_pool2d", ("adaptive_avg_pool2d",), SHARED, (0,), check=_adaptive_pool_check),
    OpSupport("mean", ("mean",), SHARED, (0,), check=_mean_check),
    OpSupport("flatten", ("flatten",), SHARED, (0,)),
    OpSupport("reshape", ("reshape",), SHARED, (0,), check=_reshape_check),
    OpSupport("permute", ("permute",), SHARED, (0,)),
]

_FP32 = "runs in fp32 inside the XNNPACK delegate"
NOTES = {
    "hardswish": f"XNNPACK has no int8 hardswish (HardswishConfig is FP32-only); {_FP32}",
    "hardsigmoid": f"XNNPACK has no int8 hardsigmoid; ExecuTorch decomposes it into add/clamp/div, which {_FP32}",
    "sigmoid": f"XNNPACK's sigmoid is FP32-only; {_FP32}",
    "avg_pool2d": f"XNNPACK's avg_pool2d is FP32-only; {_FP32}",
    "softmax": f"XNNPACK's softmax is FP32-only (last dim); {_FP32}",
    "gelu": f"XNNPACK's gelu is FP32-only; {_FP32}",
    "matmul": f"activation x activation matmul: XNNPACK's bmm is FP32-only; {_FP32}",
    "scaled_dot_product_attention": "XNNPACK has no int8 attention (its bmm and softmax are FP32-only): "
                                    "attention runs in fp32",
    "layer_norm": "XNNPACK has no layer_norm: it runs on ExecuTorch's portable float kernels",
    "embedding": "XNNPACK has no embedding (gather): it runs on ExecuTorch's portable float kernels",
    "batch_norm": "a batch-norm that does not follow a conv cannot be folded; XNNPACK runs it in fp32 at best",
    "cat": "XNNPACK's int8 cat needs one shared scale for every input; qcompile's annotator cannot yet share "
           "parameters across a list argument, so cat is annotated float (when its output is quantized the "
           "lowering re-quantizes its inputs to the output's scale and XNNPACK runs an int8 cat: see kernel)",
    "conv_transpose2d": "transposed convolution is not in this backend's int8 table yet (XNNPACK: per-tensor only)",
}

CAPABILITIES = Capabilities(
    act_dtypes=("int8",), act_symmetric=(False, True), act_bits=(8,), act_granularities=("per_tensor",),
    weight_bits=(8, 7, 6, 5, 4), weight_symmetric=(True,), weight_granularities=("per_channel", "per_tensor"),
    modes=("static", "dynamic"), unsupported_notes=NOTES,
)

# Op kinds whose int8 form is a GEMM: the "100% delegated" acceptance metric counts these.
GEMM_KINDS = ("conv1d", "conv2d", "linear")
