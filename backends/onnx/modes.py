"""Spec hooks of the ONNX backend's dynamic and weight-only modes (``OnnxBackend.prepare_passes``).

What ONNX Runtime can run decides what a user's spec may ask for; anything else is a ConfigError that
names the option:

* dynamic: activations uint8 per-tensor affine (``DynamicQuantizeLinear`` is exactly that: no per-token,
  symmetric or 7-bit variant), weights symmetric int8 per channel / per tensor (``MatMulInteger``).
* weight_only: int2..int8 uniform weights (per channel / per tensor / per group) -> ``MatMulNBits``, whose
  blocks along K are powers of two >= 16: a group size must be a multiple of 16 (a group of 96 is stored
  as 3 blocks of 32 sharing one scale). NF4 -> ``MatMulBnb4`` (group size a power of two >= 16).
  Embedding tables are int8 rows (as on x86: a gather gains nothing from fewer bits).
"""
from __future__ import annotations

import torch

from qcompile.errors import ConfigError
from qcompile.ir import module_path
from qcompile.specs import ActivationSpec, QuantSpec, WeightSpec

MIN_BLOCK, MAX_BLOCK = 16, 256  # MatMulNBits / MatMulBnb4 block sizes (powers of two)


def _where(node) -> str:
    return f"{node.name} ({module_path(node) or 'top'})"


# -- dynamic --------------------------------------------------------------------------------------------
def dynamic_act_spec(a: ActivationSpec) -> QuantSpec:
    if a.granularity != "per_tensor" or a.symmetric or a.bits != 8:
        raise ConfigError(
            f"onnx backend, mode='dynamic': activations are quantized by DynamicQuantizeLinear, which is uint8 "
            f"per-tensor affine; got activations granularity={a.granularity!r}, symmetric={a.symmetric}, "
            f"bits={a.bits}. Use ActivationSpec(granularity='per_tensor', symmetric=False, bits=8) (the default), "
            f"or backend='x86' for per-token activations.")
    return QuantSpec(dtype=torch.uint8, bits=8, dynamic=True)


def dynamic_weight_spec(w: WeightSpec, row, node, narrow: bool = True, reduce_range: bool = False) -> QuantSpec:
    if w.dtype != "int" or w.bits != 8 or not w.symmetric or w.granularity == "per_group":
        raise ConfigError(
            f"onnx backend, mode='dynamic': MatMulInteger takes symmetric int8 weights per channel or per tensor; "
            f"got weights bits={w.bits}, symmetric={w.symmetric}, granularity={w.granularity!r}, dtype={w.dtype!r}. "
            f"Low-bit, asymmetric or group-wise weights are mode='weight_only' (MatMulNBits).")
    gran = w.granularity if w.granularity in row.weight_granularities else "per_tensor"
    return QuantSpec(dtype=torch.int8, bits=8, symmetric=True, narrow=narrow, reduce_range=reduce_range,
                     granularity=gran, axis=0 if gran == "per_channel" else None, observer=w.observer)


# -- weight-only ----------------------------------------------------------------------------------------
def weight_only_spec(w: WeightSpec, row, node):
    """The x86 backend's weight-only spec (signed symmetric / unsigned affine int, NF4, int8 embedding rows,
    group-size divisibility), after the checks MatMulNBits / MatMulBnb4 add."""
    from qcompile.backends.x86.weight_only import weight_spec
    if row.name == "linear_weight_only":
        if w.dtype == "nf4" and not _pow2_block(w.group_size):
            raise ConfigError(
                f"onnx backend, mode='weight_only': NF4 runs as MatMulBnb4, whose block size is a power of two in "
                f"[{MIN_BLOCK}, {MAX_BLOCK}]; got group_size={w.group_size} for {_where(node)}")
        if w.dtype == "int" and w.granularity == "per_group" and (w.group_size % MIN_BLOCK or w.group_size < MIN_BLOCK):
            raise ConfigError(
                f"onnx backend, mode='weight_only': MatMulNBits blocks are powers of two >= {MIN_BLOCK} along K, so "
                f"group_size must be a multiple of {MIN_BLOCK} (32, 64, 128...); got group_size={w.group_size} "
                f"for {_where(node)}")
    return weight_spec(w, row, node, embedding="int8")


def _pow2_block(g) -> bool:
    return g is not None and MIN_BLOCK <= g <= MAX_BLOCK and g & (g - 1) == 0


def block_size(k: int, group_size: int | None) -> int:
    """MatMulNBits block for ``k`` inputs: the largest power of two dividing the group (per-group), else 128
    (per channel / per tensor: the scale is repeated per block, 32/128 extra bits per weight) or the
    smallest power of two >= k when k is smaller."""
    if group_size:
        return min(group_size & -group_size, MAX_BLOCK)
    return max(MIN_BLOCK, min(128, 1 << (k - 1).bit_length()))
