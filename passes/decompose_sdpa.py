"""``scaled_dot_product_attention`` -> ``matmul · scale (+ mask) -> softmax -> matmul``, exact in float.

A fused attention op is one float kernel: no backend can put its two products in int8. Written out, Q·Kᵀ
and P·V are plain ``matmul`` nodes that a backend with an int8 activation x activation kernel (x86:
``torch._int_mm`` per batch slice, see backends/x86/rules.py) annotates like any other op, while the
softmax, the scale and the mask stay float. Backends without such a kernel keep the fused op: this pass
is in a prepare pipeline only where it pays.

Rewritten: ``sdpa(q, k, v, attn_mask=None, dropout_p=0, is_causal=False, scale=None)`` with a float or
bool mask (broadcast as SDPA does) or ``is_causal``. Left fused (and reported as float) with a reason:
dropout in the graph, ``enable_gqa`` (K / V with fewer heads than Q), unknown shapes.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from qcompile import meta
from qcompile.ir import add_constant, fill_fake_val

from .infra import Pass, PassResult

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_PARAMS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_arguments(node: fx.Node) -> dict | None:
    """q, k, v and every keyword of an SDPA node (defaults filled), or None if it is not one."""
    if node.op != "call_function" or node.target != SDPA:
        return None
    args = dict(zip(("q", "k", "v") + _PARAMS, node.args))
    args.update(node.kwargs)
    for key, default in zip(_PARAMS, (None, 0.0, False, None, False)):
        args.setdefault(key, default)
    return args


def why_not(args: dict) -> str | None:
    """None when the SDPA call can be written out exactly, else the reason it stays fused."""
    vals = [getattr(args[k], "meta", {}).get("val") for k in ("q", "k", "v")]
    if any(not isinstance(v, torch.Tensor) for v in vals):
        return "shapes of q / k / v unknown"
    if args["dropout_p"] not in (0, 0.0):
        return f"dropout_p={args['dropout_p']} in the graph (capture the model in eval mode)"
    if args["enable_gqa"] or vals[0].shape[-3:-2] != vals[1].shape[-3:-2] and vals[0].dim() > 2:
        return "grouped-query attention (K / V have fewer heads than Q)"
    if args["is_causal"] and args["attn_mask"] is not None:
        return "is_causal together with attn_mask"
    return None


class DecomposeSDPA(Pass):
    """Write every exact-decomposable SDPA node out as matmul / mul / softmax / matmul (see module doc).
    ``keep(q, k, v) -> str | None``: a backend's own reason to leave an SDPA of these shapes fused (x86: an
    attention too small for its int8 kernel to pay), recorded on the node for the report."""

    def __init__(self, keep=None):
        self.keep = keep

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            args = sdpa_arguments(node)
            if args is None or why_not(args) is not None:
                continue
            reason = self.keep and self.keep(*(args[k].meta["val"] for k in ("q", "k", "v")))
            if reason:
                meta.REJECTIONS.set(node, list(meta.REJECTIONS.get(node) or []) + [reason])
                continue
            with gm.graph.inserting_before(node):
                out = self._expand(gm, node, args)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    def _expand(self, gm, node, a) -> fx.Node:
        q_val, k_val = a["q"].meta["val"], a["k"].meta["val"]
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q_val.shape[-1])
        meta = {k: v for k, v in node.meta.items() if k != "val"}

        def emit(target, *args):
            n = gm.graph.call_function(target, tuple(args))
            n.meta.update(meta)
            fill_fake_val(n)
            return n

        kt = emit(aten.transpose.int, a["k"], -2, -1)
        scores = emit(aten.mul.Tensor, emit(aten.matmul.default, a["q"], kt), float(scale))
        mask = a["attn_mask"]
        if a["is_causal"]:
            l_q, l_k = q_val.shape[-2], k_val.shape[-2]
            causal = torch.ones(l_q, l_k, dtype=torch.bool).tril()
            mask = add_constant(gm, "sdpa_causal_mask", torch.zeros(l_q, l_k).masked_fill(~causal, float("-inf")),
                                node)
            mask.meta["val"] = _fake_constant(q_val, l_q, l_k)
        if mask is not None:
            if mask.meta.get("val") is not None and mask.meta["val"].dtype == torch.bool:
                scores = emit(aten.masked_fill.Scalar, scores, emit(aten.logical_not.default, mask), float("-inf"))
            else:
                scores = emit(aten.add.Tensor, scores, mask)
        probs = emit(aten.softmax.int, scores, -1)
        return emit(aten.matmul.default, probs, a["v"])


def _fake_constant(like, l_q: int, l_k: int):
    mode = getattr(like, "fake_mode", None)
    if mode is None:
        return None
    with mode:
        return torch.empty(l_q, l_k)
