"""ONNX: a conv group feeding the model output writes int8 (QLinearConv) and is dequantized after.

With ``quantize_outputs=False`` (this backend's default) a group feeding the model output keeps a float output.
A linear there runs ONNX Runtime's MatMulIntegerToFloat: int8 GEMM, fp32 result (passes/float_output.py). ORT's
QDQ fusions have no conv of that kind: the group ran as a float Conv on dequantized weights, no int8 compute at
all. ``ConvInteger`` followed by a scale is the one int8 conv with a wide result, and on this machine (AMD EPYC
Zen 4, 1 thread, 28 x 28 input) it ran 6-40x slower than QLinearConv + DequantizeLinear: 244 vs 40 us for a
1 x 1 conv of 64 channels, 7.1 ms vs 435 us for 256 channels, 6.2 ms vs 149 us for a 7 x 7 depthwise conv.

So such a conv group gets its output quantized like every other int8 activation (its own calibrated range), as
ORT's ``quantize_static`` does: a segmentation head (SegFormer's last conv) then runs int8.
``backend_options={"quantized_output_convs": False}`` keeps the float conv.
"""
from __future__ import annotations

from torch import fx

from qcompile import annotation as A
from qcompile.ops import op_kind
from qcompile.passes.infra import Pass, PassResult

CONV_KINDS = frozenset({"conv1d", "conv2d"})
REASON = ("feeds the model output: ONNX Runtime has no fast int8 conv with a float result (ConvInteger runs "
          "6-40x slower than QLinearConv), so the conv writes int8 at its calibrated range and is dequantized")


class QuantizedOutputConvs(Pass):
    """See the module docstring."""

    requires = frozenset({"annotated"})

    def call(self, gm: fx.GraphModule) -> PassResult:
        by_name = {n.name: n for n in gm.graph.nodes}
        modified = False
        for node in list(gm.graph.nodes):
            ann = A.get_annotation(node)
            if ann is None or ann.status != A.FLOAT_OUTPUT or ann.group != node.name or op_kind(node) not in CONV_KINDS:
                continue
            spec = ann.input_specs.get(0)
            if spec is None:
                continue
            group = A.get_group(node)
            nodes = [by_name[n] for n in group.nodes] if group is not None else [node]
            for n in nodes:
                A.set_annotation(n, A.get_annotation(n).with_(
                    status=A.INT8, reason=REASON, output_spec=spec if n is nodes[-1] else None))
            modified = True
        return PassResult(gm, modified)
