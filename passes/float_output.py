"""Int8 linears whose every consumer is float keep a float output (no requantize of their result).

A transformer block's attention output projection and its second FFN linear feed the residual ``add``,
which runs in float (its other input, the residual stream, is float): quantizing the linear's output there
only adds a rounding step and a convert back. torch.ao's PT2E ``X86InductorQuantizer`` leaves these
outputs float too. A backend with an int8 GEMM that writes fp32 (x86: fbgemm's
``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``) runs such a group as int8 compute with a
float output, one kernel instead of GEMM + requantize + dequantize.

Measured on ``nn.TransformerEncoder`` (d=384, 6 layers, batch 8 x 128, x86 static): SQNR against float
40.4 -> 41.8 dB, min cosine 0.99994 -> 0.99996 (dynamic int8: 41.8 dB, 0.99997).

``convs=True`` (x86, where oneDNN's fp32-output int8 conv is built) applies the same to ``conv2d`` groups: a
ConvNeXt block's depthwise conv feeds a permute and LayerNorm, a segmentation head's last conv the model output.

``matmuls=True`` (x86) applies the same to activation x activation ``matmul`` groups: attention's Q.K^T feeds
the score scale, the mask and softmax, all float, so its scores leave the int8 kernel as fp32 instead of
being rounded to a uint8 grid that has to span every head's largest score (measured on the conformance
transformers below, see docs/backends/x86.md).

The pass runs after annotation. A linear group (``linear`` or ``linear -> relu``) whose output reaches only
float ops — directly or through int8 shape-only ops (view, permute, ...) that then become float as well —
loses its output spec and keeps its int8 status (``float_consumers=False`` skips this). A group that feeds the
model output (``quantize_outputs=False``: annotated "float: model output") is int8 compute with a float
output too on such a backend: its status becomes int8.

Before that, an int8 op that is not a GEMM (``add``, ``relu``, a pooling...) whose every consumer is float runs in
float instead (``float_consumers=False`` skips this too): in int8 it only rounds its inputs and its result, and
its result is converted back to float at once. Its producers then see a float consumer, so a linear feeding it
writes fp32. Phi's parallel block adds the attention output projection and the MLP's second linear before the
residual add; int8 there rounded both outputs and their sum (conformance Phi, x86, six held-out inputs, in
docs/backends/x86.md). Ops are visited consumers first, so a chain (``add -> relu -> float``) goes float whole.
"""
from __future__ import annotations

from torch import fx

from qcompile import annotation as A
from qcompile.ops import op_kind
from qcompile.passes.infra import Pass, PassResult

REASON = ("int8 input and weights, int8 GEMM with an fp32 output: every consumer is float, so the result is not "
          "requantized (one kernel, no rounding of the output)")
OUTPUT_REASON = "feeds the model output: int8 input and weights, int8 GEMM with an fp32 output (quantize_outputs=False)"
SHAPE_KINDS = frozenset({"reshape", "permute", "flatten", "unflatten", "unsqueeze", "squeeze", "select"})
ANCHORS = frozenset({"linear"})
GEMM_KINDS = frozenset({"linear", "conv1d", "conv2d", "conv_transpose2d", "matmul", "embedding",
                        "scaled_dot_product_attention"})
DEMOTE_REASON = ("int8 would only round its inputs and result: every consumer is float, so it runs in float on "
                 "its producers' float outputs")
CONV_REASON = ("int8 input and weights, int8 conv with an fp32 output: every consumer is float, so the result is not "
               "requantized (one kernel, no rounding of the output)")
MATMUL_REASON = ("int8 operands, int8 batched GEMM with an fp32 output: every consumer is float (e.g. the scores "
                 "of Q.K^T before softmax), so the result is not requantized")


def _float_consumers(node: fx.Node, chain: list) -> bool:
    """Whether every use of ``node``'s value is a float op (int8 shape-only ops in between are appended to
    ``chain``: they would turn float too). A model output counts as an int8 use (quantize_outputs decides)."""
    for user in node.users:
        ann = A.get_annotation(user)
        if user.op != "call_function" or ann is None:
            return False
        if ann.status != A.INT8:
            if any(user.args[i] is node for i in ann.input_specs if i < len(user.args)):
                return False  # a float-status op with an int8 input spec (e.g. a model-output group)
            continue
        group = A.get_group(user)
        if op_kind(user) in SHAPE_KINDS and (group is None or len(group.nodes) == 1):
            chain.append(user)
            if not _float_consumers(user, chain):
                return False
            continue
        return False
    return True


class FloatOutputLinears(Pass):
    """See the module docstring."""

    requires = frozenset({"annotated"})

    def __init__(self, float_consumers: bool = True, matmuls: bool = False, convs: bool = False):
        self.float_consumers = float_consumers
        self.anchors = ANCHORS | ({"matmul"} if matmuls else set()) | ({"conv2d"} if convs else set())

    def _group(self, node: fx.Node, by_name: dict) -> list | None:
        ann, group = A.get_annotation(node), A.get_group(node)
        if ann is None or op_kind(node) not in self.anchors or ann.group != node.name:
            return None
        nodes = [by_name[n] for n in group.nodes] if group is not None else [node]
        if len(nodes) > 2 or (len(nodes) == 2 and op_kind(nodes[1]) != "relu"):
            return None
        return nodes

    def _demote_float_fed(self, gm: fx.GraphModule) -> bool:
        """Non-GEMM int8 ops (alone in their group) whose every consumer is float run in float, consumers first."""
        modified = False
        for node in reversed(list(gm.graph.nodes)):
            ann, group = A.get_annotation(node), A.get_group(node)
            if ann is None or ann.status != A.INT8 or ann.group != node.name or op_kind(node) in SHAPE_KINDS:
                continue
            if (group is not None and len(group.nodes) > 1) or op_kind(node) in GEMM_KINDS or op_kind(node) is None:
                continue  # a fused group (conv + add + relu) is one kernel: not split here
            chain: list = []
            if ann.output_spec is None or not _float_consumers(node, chain):
                continue
            for n in [node] + chain:
                A.set_annotation(n, A.get_annotation(n).with_(
                    output_spec=None, input_specs={}, status=A.FLOAT_FEEDS_FLOAT, reason=DEMOTE_REASON))
            modified = True
        return modified

    def call(self, gm: fx.GraphModule) -> PassResult:
        by_name = {n.name: n for n in gm.graph.nodes}
        modified = self.float_consumers and self._demote_float_fed(gm)
        for node in list(gm.graph.nodes):
            nodes = self._group(node, by_name)
            if nodes is None:
                continue
            ann_out = A.get_annotation(nodes[-1])
            status = A.get_annotation(node).status
            if status == A.FLOAT_OUTPUT:
                for n in nodes:
                    A.set_annotation(n, A.get_annotation(n).with_(status=A.INT8, reason=OUTPUT_REASON))
                modified = True
                continue
            chain: list = []
            if not self.float_consumers or status != A.INT8 or ann_out.output_spec is None or \
                    not _float_consumers(nodes[-1], chain):
                continue
            reason = {"matmul": MATMUL_REASON, "conv2d": CONV_REASON}.get(op_kind(node), REASON)
            for n in nodes:
                A.set_annotation(n, A.get_annotation(n).with_(output_spec=None, reason=reason))
            for n in chain:
                A.set_annotation(n, A.get_annotation(n).with_(
                    output_spec=None, input_specs={}, status=A.FLOAT_FEEDS_FLOAT,
                    reason="shape-only op on the float output of an int8 GEMM (every consumer is float)"))
            modified = True
        return PassResult(gm, modified)
