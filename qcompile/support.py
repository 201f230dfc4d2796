"""Declarative support tables: what a backend runs in integer form (op patterns x dtypes x granularity).

A backend lists :class:`OpSupport` entries; the generic annotator (``qcompile.passes.annotate``) turns
them into annotations. Nothing outside this data decides what is quantized. The vocabulary is in the core
because both layers read it: backends write tables, passes read them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import fx

from .specs import FixedSpec

# How a supported group is quantized:
ANCHOR = "anchor"          # has weights (conv, linear) or is worth int8 on its own: always int8
PROPAGATE = "propagate"    # int8 kernel with its own output range (add, mul, hardswish): int8 when an input is int8
SHARED = "shared"          # output shares the input's parameters (max-pool, reshape, cat): int8 when an input is int8
FIXED = "fixed"            # output range fixed by the op (sigmoid): int8 when an input is int8


@dataclass(frozen=True)
class OpSupport:
    """One row of a support table.

    name        the pattern (and lowering rule) name, e.g. ``"conv2d_relu"``
    ops         chain of op kinds (see ``qcompile.ops.OPS``), producer first
    kind        ANCHOR / PROPAGATE / SHARED / FIXED
    act_args    argument indices of the anchor node that are activation inputs
    weight_arg / bias_arg  argument indices of the anchor's weight / bias (constants)
    weight_granularities   granularities the kernel accepts for the weight
    fixed       the output FixedSpec for FIXED entries; on an ANCHOR entry, fixed output parameters
                instead of observed ones (a GEMM whose fused clamp bounds its output, e.g. [0, 1])
    check       extra constraint on the matched nodes; returns a reason string when it fails
    """

    name: str
    ops: tuple
    kind: str = ANCHOR
    act_args: tuple[int, ...] = (0,)
    weight_arg: int | None = None
    bias_arg: int | None = None
    weight_granularities: tuple[str, ...] = ("per_channel", "per_tensor")
    fixed: FixedSpec | None = None
    check: Callable[[list[fx.Node]], str | None] | None = None
    note: str = ""


@dataclass(frozen=True)
class Capabilities:
    """What a backend accepts for activations / weights, used to validate the user's config."""

    act_dtypes: tuple = ("uint8",)
    act_symmetric: tuple[bool, ...] = (False, True)
    act_bits: tuple[int, ...] = (8,)
    act_granularities: tuple[str, ...] = ("per_tensor",)
    weight_bits: tuple[int, ...] = (8,)
    weight_symmetric: tuple[bool, ...] = (True,)
    weight_granularities: tuple[str, ...] = ("per_channel", "per_tensor")
    modes: tuple[str, ...] = ("static",)
    unsupported_notes: dict = field(default_factory=dict)  # op kind -> why it stays float
