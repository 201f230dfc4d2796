"""Full-range 8-bit weights for depthwise convs that run on oneDNN's fp32-output int8 conv.

x86 gives a depthwise conv's per-channel 8-bit weights the ``"pair_sum"`` range: fbgemm's depthwise kernel adds
two u8 x s8 products in int16 even on AVX-512 VNNI, and codes whose same-sign pairs sum to at most 128 cannot
saturate it (backend.py, ``weight_spec``). A conv whose every consumer is float does not run on fbgemm: it runs
on ``onednn::qconv2d_pointwise`` with an fp32 result (rules.py, ``_conv2d_float_output``), whose VNNI
``vpdpbusd`` sums in int32. Its weights can take the full min/max 8-bit range, and this pass gives it to them.
On a CPU without VNNI oneDNN multiplies pairs in int16 too (``vpmaddubsw``), so the pass leaves them alone.

Runs after :class:`qcompile.passes.float_output.FloatOutputLinears` (which decides which convs write fp32),
before calibration, so the weights are observed with the range they will be quantized with.
"""
from __future__ import annotations

import dataclasses

from torch import fx

from qcompile import annotation as A
from qcompile.ops import op_kind
from qcompile.passes.infra import Pass, PassResult


class FullRangeFloatOutputConvWeights(Pass):
    requires = frozenset({"annotated"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            ann = A.get_annotation(node)
            if ann is None or ann.status != A.INT8 or op_kind(node) != "conv2d" or ann.group != node.name:
                continue
            group = A.get_group(node)
            last = node if group is None else next(n for n in gm.graph.nodes if n.name == group.nodes[-1])
            spec = ann.input_specs.get(1)
            if A.get_annotation(last).output_spec is not None or spec is None or spec.observer != "pair_sum":
                continue
            A.set_annotation(node, ann.with_(input_specs={**ann.input_specs,
                                                          1: dataclasses.replace(spec, observer="minmax")}))
            modified = True
        return PassResult(gm, modified)
