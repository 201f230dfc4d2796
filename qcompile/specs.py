"""Frozen quantization intent.

A spec says *how* one tensor (a node's output or one input edge) is quantized; it never holds
calibration results. Backends attach specs to graph nodes (see ``qcompile.annotation``); observers,
fake-quant and convert only read them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

import torch

Granularity = Literal["per_tensor", "per_channel", "per_group", "per_token"]
ObserverKind = Literal["minmax", "moving_average", "percentile", "mse", "entropy", "pair_sum", "unit_scale", "auto"]

GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")
OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "entropy", "pair_sum", "unit_scale", "auto")
# "auto" (per-tensor activations): one histogram, and the range of whichever of minmax / percentile / mse /
# entropy gives the smallest model-output error on calibration data (qcompile.passes.range_choice); "mse" until chosen.
# "pair_sum" (per-channel weights): any two same-sign codes of a channel sum to at most 128 in magnitude, so a
# kernel adding two u8 x s8 products in int16 cannot saturate (qcompile.observers.PerChannelPairSumObserver).
# "unit_scale" (per-tensor activations): scale 1, zero point at the bottom of the range, for values already
# on the integers 0..255 (exact 8-bit inputs, passes/input_lattice.py; qcompile.observers.UnitScaleObserver)
_INT_DTYPES = {torch.int8: True, torch.uint8: False, torch.int32: True, torch.int16: True}


@dataclass(frozen=True)
class QuantSpec:
    """One tensor's quantization scheme.

    dtype     storage dtype (int8 / uint8 / int32); ``bits`` may be fewer than the dtype holds.
    symmetric zero point fixed (0 for signed, 2**(bits-1) for unsigned) instead of fitted.
    narrow    signed symmetric range [-(2**(b-1)-1), 2**(b-1)-1] (drops -128, as XNNPACK wants).
    reduce_range  one bit fewer than ``bits`` (AVX2 u8*s8 saturation work-around, as torch.ao x86).
    granularity / axis / group_size  per_tensor, per_channel along ``axis``, per_group of
              ``group_size`` along the last axis, per_token (dynamic activations).
    observer / percentile  how calibration picks the range.
    dynamic   activation parameters chosen at run time from each tensor (dynamic mode): no observer.
    """

    dtype: torch.dtype = torch.uint8
    bits: int = 8
    symmetric: bool = False
    narrow: bool = False
    reduce_range: bool = False
    granularity: Granularity = "per_tensor"
    axis: int | None = None
    group_size: int | None = None
    observer: ObserverKind = "minmax"
    percentile: float = 99.99
    averaging_constant: float = 0.01
    dynamic: bool = False

    def __post_init__(self):
        if self.dtype not in _INT_DTYPES:
            raise ValueError(f"QuantSpec dtype must be one of {list(_INT_DTYPES)}, got {self.dtype}")
        width = torch.iinfo(self.dtype).bits
        if not 2 <= self.bits <= width:
            raise ValueError(f"QuantSpec bits={self.bits} does not fit in {self.dtype}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "per_channel" and self.axis is None:
            raise ValueError("per_channel QuantSpec needs an axis")
        if self.granularity == "per_group" and not self.group_size:
            raise ValueError("per_group QuantSpec needs a group_size")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}, got {self.observer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    @property
    def signed(self) -> bool:
        return _INT_DTYPES[self.dtype]

    @property
    def effective_bits(self) -> int:
        return self.bits - 1 if self.reduce_range else self.bits

    @property
    def quant_min(self) -> int:
        b = self.effective_bits
        if self.signed:
            return -(2 ** (b - 1)) + (1 if self.narrow else 0)
        return 0

    @property
    def quant_max(self) -> int:
        b = self.effective_bits
        return 2 ** (b - 1) - 1 if self.signed else 2**b - 1

    def describe(self) -> str:
        kind = "sym" if self.symmetric else "affine"
        gran = self.granularity
        if self.granularity == "per_channel":
            gran += f"(axis={self.axis})"
        elif self.granularity == "per_group":
            gran += f"({self.group_size})"
        name = {torch.int8: "int", torch.uint8: "uint", torch.int32: "int", torch.int16: "int"}[self.dtype]
        how = "dynamic" if self.dynamic else self.observer
        return f"{name}{self.effective_bits} {kind} {gran} [{how}]"


@dataclass(frozen=True)
class SharedSpec:
    """Share quantization parameters with the output of node ``node`` (max-pool, reshape, cat...)."""

    node: str


@dataclass(frozen=True)
class DerivedSpec:
    """Parameters derived from other tensors' parameters: bias scale = input scale * weight scale."""

    from_args: tuple[int, ...]  # argument indices of the consuming node whose scales multiply
    dtype: torch.dtype = torch.int32
    kind: str = "bias"


@dataclass(frozen=True)
class FixedSpec:
    """Fixed parameters an op's output range dictates (sigmoid: [0, 1) with scale 1/256)."""

    scale: float
    zero_point: int
    dtype: torch.dtype = torch.uint8
    quant_min: int = 0
    quant_max: int = 255


@dataclass(frozen=True)
class NF4Spec:
    """4-bit NormalFloat weights (QLoRA): per group of ``group_size`` weights along the last axis, an
    absmax scale and 16 codes placed at normal quantiles. ``double_quant``: the absmax scales are
    themselves quantized to uint8 per block of ``scale_block`` scales (affine, fp32 scale and offset)."""

    group_size: int = 64
    double_quant: bool = True
    scale_block: int = 256

    def describe(self) -> str:
        return f"nf4 per_group({self.group_size}){' double-quant scales' if self.double_quant else ''}"


Spec = Union[QuantSpec, SharedSpec, DerivedSpec, FixedSpec, NF4Spec]


@dataclass(frozen=True)
class QParams:
    """Calibrated parameters for one tensor: what an observer produces and convert consumes."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    dtype: torch.dtype
    axis: int | None = None
    group_size: int | None = None

    @property
    def per_tensor(self) -> bool:
        return self.axis is None and self.group_size is None

    def to_json(self) -> dict:
        return {
            "scale": self.scale.flatten().tolist(), "zero_point": self.zero_point.flatten().tolist(),
            "quant_min": self.quant_min, "quant_max": self.quant_max, "dtype": str(self.dtype),
            "axis": self.axis, "group_size": self.group_size,
        }


@dataclass(frozen=True)
class WeightSpec:
    """User-facing weight configuration; the backend turns it into a QuantSpec.

    sensitive_bits: with ``bits`` below it (integer weights), the convs that low-bit weights break -- depthwise
      convs (9-25 weights per output channel, no averaging of the rounding error) and the first conv (reads
      the model input) -- keep this many bits, as AdaRound / BRECQ / AIMET's W4A8 results keep the first
      layer at 8 bits; their weights are a small share of a network's bytes. The report names each such
      layer. None: every layer gets ``bits``. A per-module config (``module_names`` / ``module_types``)
      always wins.
    observer: how each weight scale is chosen. None (default): "mse" (the scale, per channel, with the least
      squared rounding error over 100 shrink factors of the abs-max) for per-channel integer weights of 4 bits or
      fewer, where a 16-level grid stretched to the largest weight wastes most of its levels
      (EfficientNet-Lite2 w4a8, x86: 57.1 -> 62.2 % agreement); "minmax" otherwise."""

    bits: int = 8
    granularity: Granularity = "per_channel"
    symmetric: bool = True
    group_size: int | None = None
    observer: ObserverKind | None = None
    dtype: str = "int"  # "int" or "nf4" (weight-only; 4-bit, per_group, group_size 64 by default)
    double_quant: bool = True  # nf4 only: quantize the per-group absmax scales to 8 bits (QLoRA)
    sensitive_bits: int | None = 8

    def __post_init__(self):
        if self.dtype not in ("int", "nf4"):
            raise ValueError(f"WeightSpec dtype must be 'int' or 'nf4', got {self.dtype!r}")
        if self.dtype == "nf4":
            object.__setattr__(self, "bits", 4)
            object.__setattr__(self, "group_size", self.group_size or 64)
        if self.group_size is not None and self.granularity != "per_group":
            object.__setattr__(self, "granularity", "per_group")
        if self.granularity not in ("per_tensor", "per_channel", "per_group"):
            raise ValueError(f"WeightSpec granularity must be per_tensor/per_channel/per_group, got {self.granularity!r}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"WeightSpec bits must be in 2..8, got {self.bits}")
        if self.sensitive_bits is not None and not 2 <= self.sensitive_bits <= 8:
            raise ValueError(f"WeightSpec sensitive_bits must be None or in 2..8, got {self.sensitive_bits}")
        object.__setattr__(self, "default_observer", self.observer is None)  # not a field: replace() re-chooses
        if self.observer is None:
            low = self.dtype == "int" and self.bits <= 4 and self.granularity == "per_channel"
            object.__setattr__(self, "observer", "mse" if low else "minmax")


@dataclass(frozen=True)
class ActivationSpec:
    """User-facing activation configuration; the backend turns it into a QuantSpec."""

    bits: int = 8
    symmetric: bool = False
    observer: ObserverKind = "mse"
    percentile: float = 99.99
    granularity: Granularity = "per_tensor"

    def __post_init__(self):
        if self.observer not in OBSERVERS:
            raise ValueError(f"ActivationSpec observer must be one of {OBSERVERS}, got {self.observer!r}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"ActivationSpec bits must be in 2..8, got {self.bits}")
