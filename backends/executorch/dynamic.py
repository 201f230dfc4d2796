"""The ExecuTorch backend's dynamic mode: int8 / int4 weights, activations quantized by XNNPACK at run time.

Facts from ExecuTorch 1.5.1's XNNPACK delegate (``backends/xnnpack/partition/config/gemm_configs.py``,
``utils/quant_utils.py``, ``operators/node_visitor.py``):

* ``LinearConfig`` (and ``ConvolutionConfig`` for standard 2-D convolutions) accept DYNAMIC_QUANT
  precision: the activation input is ``dequantize(quantize(x, getitem(choose_qparams(x))))`` with one of
  ``choose_qparams.tensor`` / ``choose_qparams_per_token_asymmetric`` / ``choose_qparams_affine``, the
  weight an int8 constant -> ``dequantize_per_channel`` (or ``dequantize_per_channel_group``, 4-bit groups
  of a multiple of 32, scales serialized as bfloat16). A per-tensor weight is declined ("XNNPACK does
  not support per tensor quantized weights for dynamic quantization of activations"). The output is float.
* Whatever the chain says, XNNPACK quantizes the activation per row ("per token"): the serializer writes
  ``PerTokenDynamicQuant`` for a per-tensor chain too, as asymmetric int8 (qd8) rows of the flattened
  leading dimensions. The reference graph here therefore says what runs:
  ``choose_qparams_per_token_asymmetric -> quantize_per_token -> dequantize_per_token`` (int8, affine,
  one scale / zero point per row of the last dimension), so ``verify`` compares like with like.
  (ExecuTorch's own ``XNNPACKQuantizer(is_dynamic=True)`` writes the per-tensor chain and gets rows anyway.)

This mode covers linear layers (XNNPACK's qd8 x qc8w fully-connected; qd8 x qc4w / qb4w for 4-bit weights
per channel / per group); convolutions, attention matmuls, embeddings and norms stay float (XNNPACK fp32
where it has the op, portable kernels otherwise).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import fx

from qcompile import annotation as A
from qcompile import meta
from qcompile.errors import ConfigError
from qcompile.ir import get_attr_value
from qcompile.observers import weight_qparams
from qcompile.passes.infra import Pass, PassResult
from qcompile.support import ANCHOR, Capabilities, OpSupport
from qcompile.specs import ActivationSpec, QuantSpec, WeightSpec

from .support import _FP32  # the static table's wording for ops XNNPACK runs in fp32

qd = torch.ops.quantized_decomposed

NOTE = "int8 (or packed int4) weights per channel; int8 activations quantized per row at run time (XNNPACK qd8)"

DYNAMIC_TABLE = [OpSupport("linear_dynamic", ("linear",), ANCHOR, (0,), 1, 2, note=NOTE,
                           weight_granularities=("per_channel", "per_tensor", "per_group"))]

DYNAMIC_NOTES = {
    "conv2d": f"this mode covers linear layers; use static mode for int8 convolutions (here it {_FP32})",
    "conv1d": f"this mode covers linear layers; use static mode for int8 convolutions (here it {_FP32})",
    "matmul": f"activation x activation matmul (attention): XNNPACK's bmm is FP32-only; {_FP32}",
    "softmax": f"float in this mode: XNNPACK's softmax is FP32-only; {_FP32}",
    "gelu": f"float in this mode: XNNPACK's gelu is FP32-only; {_FP32}",
    "layer_norm": "XNNPACK has no layer_norm: it runs on ExecuTorch's portable float kernels",
    "embedding": "an embedding is a gather, not a GEMM: ExecuTorch's portable float kernels",
}

CAPABILITIES = Capabilities(
    act_dtypes=("int8",), act_symmetric=(False,), act_bits=(8,), act_granularities=("per_token",),
    weight_bits=(8, 4), weight_symmetric=(True,), weight_granularities=("per_channel", "per_tensor", "per_group"),
    modes=("static", "dynamic"), unsupported_notes=DYNAMIC_NOTES,
)


def default_config():
    from qcompile.config import QConfig
    return QConfig(weights=WeightSpec(bits=8, granularity="per_channel", symmetric=True),
                   activations=ActivationSpec(granularity="per_token", symmetric=False))


def act_spec(a: ActivationSpec) -> QuantSpec:
    if a.granularity != "per_token" or a.symmetric or a.bits != 8:
        raise ConfigError(
            "executorch backend, mode='dynamic': XNNPACK quantizes a dynamic linear's input per row at run time, "
            "as asymmetric int8 (qd8), whatever the graph asks; got activations "
            f"granularity={a.granularity!r}, symmetric={a.symmetric}, bits={a.bits}. Use "
            "ActivationSpec(granularity='per_token', symmetric=False) (the default for this mode).")
    return QuantSpec(dtype=torch.int8, bits=8, symmetric=False, granularity="per_token", dynamic=True)


def weight_spec(w: WeightSpec, row, node) -> QuantSpec:
    """Symmetric int8 [-127, 127] (XNNPACK's qc8w, zero point 0), or 4-bit [-8, 7]: packed two per byte
    (qd8 x qc4w) when the input features are even, else codes kept in int8 (``lower.weight_containers``).
    Per-tensor weights are stored per channel with one repeated scale when lowering
    (``per_channel_weights``): XNNPACK's dynamic GEMM takes only those."""
    if w.dtype != "int" or w.bits not in (8, 4) or not w.symmetric or w.granularity not in ("per_channel", "per_tensor", "per_group"):
        raise ConfigError(
            "executorch backend, mode='dynamic': XNNPACK's dynamic fully-connected takes symmetric 8- or 4-bit "
            f"weights per channel (or per tensor); got weights bits={w.bits}, symmetric={w.symmetric}, "
            f"granularity={w.granularity!r}, dtype={w.dtype!r}. Use mode='static' for low-bit weights.")
    gran = w.granularity
    if gran == "per_group":
        _check_groups(w, node)
    return QuantSpec(dtype=torch.int8, bits=w.bits, symmetric=True, narrow=w.bits == 8, granularity=gran,
                     axis=0 if gran == "per_channel" else None, group_size=w.group_size, observer=w.observer)


def _check_groups(w: WeightSpec, node: fx.Node) -> None:
    """qd8 x qb4w: 4-bit groups along the input features, a multiple of 32 dividing them (ExecuTorch 1.5.1's
    XNNPACK serializer asserts both)."""
    from qcompile.ir import module_path
    weight = node.args[1] if len(node.args) > 1 else None
    val = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    k = val.shape[-1] if val is not None else None
    where = f"{node.name} ({module_path(node) or 'top'})"
    if w.bits != 4:
        raise ConfigError(f"executorch backend, mode='dynamic': XNNPACK's group-wise kernel (qb4w) is 4-bit only; got "
                          f"weights bits={w.bits}, granularity='per_group' for {where}. Use bits=4, or per_channel.")
    if w.group_size % 32:
        raise ConfigError(f"executorch backend, mode='dynamic': XNNPACK's qb4w needs group_size a multiple of 32; got "
                          f"{w.group_size} for {where}")
    if k is not None and k % w.group_size:
        raise ConfigError(f"executorch backend, mode='dynamic': group_size={w.group_size} does not divide the "
                          f"{k} input features of {where}; pick a divisor (32, 64, 128...) or exclude it.")


# -- recognising the run-time quantize chain in a reference graph ---------------------------------------
_DYNAMIC_DQ = (qd.dequantize_per_token.default, qd.dequantize_per_tensor.tensor)
_CHOOSE = (qd.choose_qparams_per_token_asymmetric.default, qd.choose_qparams.tensor)


def is_dynamic_input(x) -> bool:
    """``x`` is ``dequantize(quantize(src, getitem(choose_qparams(src))))``: quantized when the graph runs."""
    if not (isinstance(x, fx.Node) and x.target in _DYNAMIC_DQ and isinstance(x.args[1], fx.Node)):
        return False
    getitem = x.args[1]
    return bool(getitem.args) and isinstance(getitem.args[0], fx.Node) and getitem.args[0].target in _CHOOSE


def dynamic_gemms(gm: fx.GraphModule) -> list[fx.Node]:
    """Linear nodes whose activation input is quantized at run time."""
    return [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default and is_dynamic_input(n.args[0])]


def per_channel_weights(gm: fx.GraphModule, to_per_channel) -> list[str]:
    """Store a dynamic linear's per-tensor int8 weight per channel (one repeated scale, same arithmetic):
    XNNPACK's partitioner declines a dynamic GEMM with a per-tensor weight. Returns the linears changed."""
    done = []
    for node in dynamic_gemms(gm):
        w = node.args[1]
        if isinstance(w, fx.Node) and w.target == qd.dequantize_per_tensor.default and w.args[0].op == "get_attr":
            to_per_channel(gm, w, get_attr_value(gm, w.args[0]).shape[0])
            done.append(node.name)
    if done:
        gm.recompile()
    return done



class Bf16GroupScales(Pass):
    """Group-wise 4-bit weights of dynamic linears get bf16-representable scales before convert.

    ExecuTorch's serializer stores per-channel-group scales as bfloat16 (``node_visitor.get_quant_params``),
    so XNNPACK's qd8 x qb4w kernel multiplies by the bf16-rounded scale. Rounding the scales here (and
    quantizing the weights with them, in convert) makes the reference graph compute what the program does.
    Weights a later algorithm re-quantizes (GPTQ) keep that algorithm's fp32 scales."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            ann = A.get_annotation(node)
            spec = ann.input_specs.get(1) if ann is not None else None
            w_node = node.args[1] if node.op == "call_function" and len(node.args) > 1 else None
            if not (isinstance(spec, QuantSpec) and spec.granularity == "per_group" and isinstance(w_node, fx.Node)
                    and w_node.op == "get_attr"):
                continue
            qp = meta.WEIGHT_QPARAMS.get(w_node) or weight_qparams(get_attr_value(gm, w_node).detach().float(), spec)
            meta.WEIGHT_QPARAMS.set(w_node, dataclasses.replace(qp, scale=qp.scale.to(torch.bfloat16).float()))
            modified = True
        return PassResult(gm, modified)


def group_containers(gm: fx.GraphModule) -> dict[str, str]:
    """Dynamic linears with group-wise 4-bit weights -> how the program stores them (ExecuTorch packs a
    ``dequantize_per_channel_group`` int8 constant in [-8, 7] two codes per byte for XNNPACK's qb4w)."""
    out = {}
    for node in dynamic_gemms(gm):
        w = node.args[1]
        if isinstance(w, fx.Node) and w.target == qd.dequantize_per_channel_group.default and \
                tuple(w.args[3:5]) == (-8, 7):
            out[node.name] = f"4-bit weights packed two per byte, groups of {w.args[6]}: XNNPACK qb4w"
    return out
