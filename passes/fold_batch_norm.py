"""Fold eval-mode batch-norm into the preceding conv / linear (new weight and bias constants)."""
from __future__ import annotations

import torch
from torch import fx

from qcompile.ir import erase_dead_params, get_attr_value, is_param, replace_weight_bias

from .infra import Pass, PassResult
from .rewrite import Match, Rule, RuleSet, rewrite_graph

aten = torch.ops.aten


def _bn_args(bn: fx.Node):
    a = list(bn.args)
    if bn.target == aten.batch_norm.default:  # x, w, b, mean, var, training, momentum, eps, cudnn
        return a[1], a[2], a[3], a[4], a[5], a[7]
    return a[1], a[2], a[3], a[4], False, a[6]  # _native_batch_norm_legit_no_training: x,w,b,mean,var,mom,eps


def _check(nodes) -> str | None:
    conv, bn = nodes
    if not is_param(conv.args[1]):
        return "weight is not a constant parameter"
    *_, training, _eps = _bn_args(bn)
    if training:
        return "batch-norm is in training mode (use prepare_qat for conv-BN training)"
    if any(a is not None and not is_param(a) for a in _bn_args(bn)[:4]):
        return "batch-norm statistics are not constants"
    return None


def fold_params(w, b, gamma, beta, mean, var, eps):
    """Return (w', b') of conv/linear followed by batch-norm; output channels on axis 0."""
    inv = torch.rsqrt(var + eps)
    g = gamma if gamma is not None else torch.ones_like(mean)
    be = beta if beta is not None else torch.zeros_like(mean)
    scale = g * inv
    w2 = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b0 = b if b is not None else torch.zeros_like(mean)
    return w2, (b0 - mean) * scale + be


def _fold(m: Match) -> bool:
    gm, (conv, bn) = m.ctx, m
    val = lambda n: None if n is None else get_attr_value(gm, n).detach()  # noqa: E731
    gamma, beta, mean, var, _, eps = _bn_args(bn)
    bias_node = conv.args[2] if len(conv.args) > 2 else None
    w2, b2 = fold_params(val(conv.args[1]), val(bias_node), val(gamma), val(beta), val(mean), val(var), eps)
    replace_weight_bias(gm, conv, w2, b2, "folded")
    out = bn
    if bn.target != aten.batch_norm.default:  # tuple output: replace getitem[0]
        out = next(u for u in bn.users if u.args[1] == 0)
    out.replace_all_uses_with(conv)
    for n in [out, bn] if out is not bn else [bn]:
        if not n.users:
            gm.graph.erase_node(n)
    return True


RULES = RuleSet([
    Rule("conv2d_bn", ("conv2d", "batch_norm"), _check, rewrite=_fold),  # conv2d -> bn  ->  conv2d(w', b')
    Rule("conv1d_bn", ("conv1d", "batch_norm"), _check, rewrite=_fold),  # conv1d -> bn  ->  conv1d(w', b')
    Rule("linear_bn", ("linear", "batch_norm"), _check, rewrite=_fold),  # linear -> bn  ->  linear(w', b')
])


class FoldBatchNorm(Pass):
    def __init__(self, rules: RuleSet = RULES):
        self.rules = rules

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = rewrite_graph(gm, self.rules) > 0
        if modified:
            erase_dead_params(gm)
        return PassResult(gm, modified)
