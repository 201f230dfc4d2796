"""Full-range 8-bit weights for depthwise convs that run on oneDNN, whose int8 sums are exact on VNNI CPUs.

x86 gives a depthwise conv's per-channel 8-bit weights the ``"pair_sum"`` range: fbgemm's depthwise kernel adds
two u8 x s8 products in int16 even on AVX-512 VNNI, and codes whose same-sign pairs sum to at most 128 cannot
saturate it (backend.py, ``weight_spec``). That range costs 0.7-5 dB of weight SQNR per layer on
EfficientNet-Lite2's depthwise convs. oneDNN's int8 conv sums in int32 with VNNI's ``vpdpbusd``: with
full-range codes it stays within one step of the reference where fbgemm's depthwise is up to 33 steps off
(docs/x86-kernels.md), and it measured as fast on depthwise shapes. So on a VNNI CPU this pass gives the
weights of these convs the full min/max range:

* a conv whose every consumer is float (it runs on ``onednn::qconv2d_pointwise`` with an fp32 result, rules.py
  ``_conv2d_float_output``): always;
* an int8-output depthwise conv, with ``X86Options(depthwise_full_range=True)`` (the default): the lowering then
  packs it for oneDNN only (rules.py ``_pack``), whatever the engine option or the measured choice would pick.

On a CPU without VNNI oneDNN multiplies pairs in int16 too (``vpmaddubsw``), so the backend does not run the pass.

Runs after :class:`qcompile.passes.float_output.FloatOutputLinears` (which decides which convs write fp32),
before calibration, so the weights are observed with the range they will be quantized with.
"""
from __future__ import annotations

import dataclasses

from torch import fx

from qcompile import annotation as A
from qcompile.ops import op_kind
from qcompile.passes.infra import Pass, PassResult


class FullRangeConvWeights(Pass):
    requires = frozenset({"annotated"})

    def __init__(self, int8_outputs: bool = True):
        self.int8_outputs = int8_outputs

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            ann = A.get_annotation(node)
            if ann is None or ann.status != A.INT8 or op_kind(node) != "conv2d" or ann.group != node.name:
                continue
            group = A.get_group(node)
            last = node if group is None else next(n for n in gm.graph.nodes if n.name == group.nodes[-1])
            spec = ann.input_specs.get(1)
            if spec is None or spec.observer != "pair_sum":
                continue
            if A.get_annotation(last).output_spec is not None and not self.int8_outputs:
                continue
            A.set_annotation(node, ann.with_(input_specs={**ann.input_specs,
                                                          1: dataclasses.replace(spec, observer="minmax")}))
            modified = True
        return PassResult(gm, modified)
