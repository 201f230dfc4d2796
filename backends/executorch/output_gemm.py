"""Linears that feed the model output run as XNNPACK's dynamically quantized GEMM: int8 compute, fp32 output.

A static int8 program rounds the model's output to an int8 grid fitted on the calibration data. An input whose
outputs leave that range is clipped: on the conformance PoolFormer and RegNet (random weights, 4 calibration
samples) one held-out input in six fell to 8.3 and 18.0 dB against float, against 31.1 and 28.6 dB with a float
output. XNNPACK has no static int8-input / fp32-output GEMM (a static GEMM with a float output runs in fp32 on
dequantized weights, lower.float_output_weights). It does have the dynamic one: ``qd8 x qc8w`` (and ``qc4w``),
which quantizes its input per row at run time and writes fp32 -- what ``mode="dynamic"`` runs for every linear
(dynamic.py). So a linear whose output is a model output (and nothing else) keeps its int8 weights and int8
compute, takes its input quantized per row (as dynamic.act_spec), and leaves its result float -- whether
``quantize_outputs`` is True (this backend's default, which still quantizes the outputs of other ops: a conv
writing float would run in fp32 on dequantized weights) or False. ``backend_options={"dynamic_output_linears":
False}`` turns it off.

Runs after annotation, before calibration (the dynamic input needs no observer).
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile import annotation as A
from qcompile.ops import op_kind
from qcompile.passes.infra import Pass, PassResult
from qcompile.specs import QuantSpec

SPEC = QuantSpec(dtype=torch.int8, bits=8, symmetric=False, granularity="per_token", dynamic=True)
REASON = ("feeds the model output: XNNPACK's dynamically quantized GEMM (input quantized per row at run time, int8 "
          "weights and compute), fp32 output, so the model's output is not rounded or clipped to a calibrated range; "
          "backend_options={'dynamic_output_linears': False} turns it off")


class DynamicOutputLinears(Pass):
    requires = frozenset({"annotated"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            ann = A.get_annotation(node)
            if ann is None or ann.status not in (A.FLOAT_OUTPUT, A.INT8) or op_kind(node) != "linear" or \
                    ann.group != node.name or not node.users or any(u.op != "output" for u in node.users):
                continue
            group = A.get_group(node)
            wspec = ann.input_specs.get(1)
            if (group is not None and len(group.nodes) > 1) or not isinstance(wspec, QuantSpec) or \
                    wspec.bits not in (8, 4) or wspec.granularity not in ("per_channel", "per_tensor"):
                continue
            A.set_annotation(node, ann.with_(input_specs={**ann.input_specs, 0: SPEC}, output_spec=None,
                                             status=A.INT8, reason=REASON))
            modified = True
        return PassResult(gm, modified)
