"""Depthwise convs that feed only float ops run in fp32 (int8 inputs and int8-valued weights, float output).

After hardswish-activated depthwise convs (MobileNetV3-style blocks) the output is used in fp32 anyway:
XNNPACK has no int8 hardswish on a tensor that is pooled and multiplied in fp32. Quantizing the conv's
output there only adds a rounding step, a requantize and a convert back; and on x86 XNNPACK's fp32
depthwise kernels beat its qc8 ones (ETDump, MobileNetV2 at 224 px: 14x14x576 3x3 in 39 us vs 74 us,
the hardswish blocks' eleven depthwise convs 283 us vs 488 us). So such a group keeps its int8 input
and weights (what the reference computes with) and leaves its output float, like a model output with
``quantize_outputs=False``; the lowering then runs it on the dequantized weights in fp32.
"""
from __future__ import annotations

from torch import fx

from qcompile import annotation as A
from qcompile.ir import is_depthwise_conv
from qcompile.passes.infra import Pass, PassResult
from qcompile.ops import op_kind

REASON = ("depthwise conv whose consumers are all float: int8 input and weights, fp32 compute and output (no "
          "requantize-then-dequantize; XNNPACK's fp32 depthwise is faster than its int8 one on x86), "
          "as backend_options={'float_depthwise': True} asked")


def _consumes_int8(user: fx.Node, producer: fx.Node) -> bool:
    ann = A.get_annotation(user)
    if ann is None or user.op != "call_function":
        return user.op == "output"  # a model output: leave quantize_outputs in charge
    return any(i < len(user.args) and user.args[i] is producer for i in ann.input_specs) or \
        (ann.status == A.INT8 and producer in user.all_input_nodes)


class FloatDepthwiseOutput(Pass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        by_name = {n.name: n for n in gm.graph.nodes}
        for anchor in [n for n in gm.graph.nodes if n.op == "call_function"]:
            ann, fused = A.get_annotation(anchor), A.get_group(anchor)
            if ann is None or ann.status != A.INT8 or ann.group != anchor.name or op_kind(anchor) != "conv2d" \
                    or not is_depthwise_conv(gm, anchor):
                continue
            group = [by_name[name] for name in fused.nodes] if fused is not None else [anchor]
            out = group[-1]
            if A.get_annotation(out).output_spec is None or any(_consumes_int8(u, out) for u in out.users):
                continue
            for n in group:
                a = A.get_annotation(n)
                A.set_annotation(n, a.with_(output_spec=None, status=A.FLOAT_FEEDS_FLOAT, reason=REASON))
            modified = True
        return PassResult(gm, modified)
