"""Fold hardsigmoid's affine part into the conv / linear before it.

    hardsigmoid(W x + b) = clamp((W x + b + 3) / 6, 0, 1) = hardtanh(W' x + b', 0, 1)
    with W' = W / 6 and b' = (b + 3) / 6

The rewrite is exact in real arithmetic (float rounding aside: a division by 6 moves into the
weights). It helps a backend that fuses a clamp into its GEMM's output range but has no hardsigmoid
kernel: XNNPACK runs ``hardsigmoid`` as add / clamp / divide in fp32 (three ops, plus layout
transposes and conversions around them), while ``conv -> hardtanh(0, 1)`` is one int8 GEMM whose
output is the [0, 1] gate itself. A squeeze-excite gate quantized over [0, 1] is also finer than the
pre-activation it replaces (its range is typically ten times wider).

Applied only when the weight (and bias, if any) are constants and the conv / linear feeds nothing
but the hardsigmoid. New constants are registered on the graph module: the user's model is untouched.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile.ir import erase_dead_params, get_attr_value, is_param, replace_weight_bias

from .infra import Pass, PassResult
from .rewrite import Match, Rule, RuleSet, rewrite_graph

aten = torch.ops.aten


def _check(nodes) -> str | None:
    gemm = nodes[0]
    if gemm.kwargs:
        return "conv / linear called with keyword arguments"
    if not is_param(gemm.args[1]):
        return "weight is not a constant parameter"
    bias = gemm.args[2] if len(gemm.args) > 2 else None
    if bias is not None and not is_param(bias):
        return "bias is not a constant parameter"
    return None


def fold_params(w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W / 6, (b + 3) / 6) with output channels on axis 0."""
    b0 = b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return w / 6.0, (b0 + 3.0) / 6.0


def _fold(m: Match) -> bool:
    gm, (gemm, hsig) = m.ctx, m
    bias = gemm.args[2] if len(gemm.args) > 2 else None
    w2, b2 = fold_params(get_attr_value(gm, gemm.args[1]).detach(),
                         None if bias is None else get_attr_value(gm, bias).detach())
    replace_weight_bias(gm, gemm, w2, b2, "hsig")
    with gm.graph.inserting_before(hsig):
        clamp = gm.graph.call_function(aten.hardtanh.default, (gemm, 0.0, 1.0))
    clamp.meta.update({k: v for k, v in hsig.meta.items()
                       if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace", "source_fn_stack")})
    hsig.replace_all_uses_with(clamp)
    gm.graph.erase_node(hsig)
    return True


# gemm(x, W, b) -> hardsigmoid  ->  gemm(x, W / 6, (b + 3) / 6) -> hardtanh(0, 1), for conv2d / conv1d / linear
RULES = RuleSet([Rule(f"{op}_hardsigmoid", (op, "hardsigmoid"), _check, rewrite=_fold)
                 for op in ("conv2d", "conv1d", "linear")])


class FoldHardsigmoid(Pass):
    def __init__(self, rules: RuleSet = RULES):
        self.rules = rules

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = rewrite_graph(gm, self.rules) > 0
        if modified:
            erase_dead_params(gm)
            gm.recompile()
        return PassResult(gm, modified)
