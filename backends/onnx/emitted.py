"""What emitting a reference graph as ONNX produced: the model and the bookkeeping the report reads.

Its own module so that ``emit`` (which produces it), ``naming`` (which fills it in) and ``lower`` (which
reads it) each import it without importing one another in a circle.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import torch


@dataclass(frozen=True)
class QInfo:
    """An activation QuantizeLinear in the emitted model and the reference node it came from."""

    fx_node: str      # reference quantize node
    value: str        # ONNX name of its (integer) output
    source: str       # reference node whose float output it quantizes
    module: str
    scale: float
    zero_point: int
    dtype: torch.dtype


@dataclass
class Emitted:
    model: onnx.ModelProto
    opset: int
    dynamic_batch: bool
    inputs: list                                     # ONNX input names, per flat input (None: not a tensor)
    outputs: list                                    # ONNX output names (None for non-tensor leaves)
    out_template: list                               # output leaves: None = tensor from ORT, else a constant
    node_of: dict = field(default_factory=dict)      # ONNX node name -> reference fx node name
    onnx_of: dict = field(default_factory=dict)      # reference fx node name -> [ONNX node names]
    quantized: list = field(default_factory=list)    # QInfo of every activation quantize node
    weights: dict = field(default_factory=dict)      # ONNX weight DQ node name -> reference dq node name
    notes: list = field(default_factory=list)
    storage: dict = field(default_factory=dict)      # initializer -> (reference layer, role, weights it holds)
    kernel_notes: dict = field(default_factory=dict)  # reference node -> (ONNX op emitted for it, what it runs)


def flat_inputs(args: tuple, kwargs: dict) -> list:
    return list(torch.utils._pytree.arg_tree_leaves(*args, **(kwargs or {})))
