"""Conv + batch-norm and dropout for quantization-aware training: train / eval switching of captured graphs.

The standard conv-BN QAT formulation (Jacob et al. 2018; torch.ao's ``ConvBn2d``, PT2E's
``_qat_conv_bn_pattern``): batch-norm stays live while the conv runs with the weight that folding would
produce, so the weight fake-quant sees (and training adapts to) the folded weight's grid::

    sf = gamma / sqrt(running_var + eps)                      # per output channel
    y  = conv(x, fake_quant(w * sf), bias=None) / sf (+ b)    # = conv(x, w) up to weight quantization
    out = batch_norm(y, gamma, beta, running_mean, running_var, training, momentum, eps)

In training the batch-norm normalises with batch statistics and updates its running statistics; in eval
(or with frozen statistics) it is exactly the folded conv: ``conv(x, fq(w * sf)) + (b - mean) * sf + beta``,
which is what :class:`FoldConvBn` produces at convert.

Passes, in pipeline order:
  StripBnCounters  before Normalize: drop ``num_batches_tracked.add_(1)`` (the QAT model counts in Python)
  DetachDropout    before annotation: PTQ's graph has no dropout; ReattachDropout puts it back last
  CollapseConvBn   replaces FoldBatchNorm in the backend's prepare list: conv keeps its raw weight, the
                   batch-norm is removed from the chain and remembered in ``conv.meta`` so fusion and
                   annotation see exactly the graph PTQ would see (conv+relu groups, a constant weight)
  ExpandConvBn     after activation fake-quant insertion: re-inserts the formulation above
  FoldConvBn       at convert, on an eval-mode copy: folded weight / bias constants, the chain removed
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompile import meta
from qcompile.ir import add_constant, copy_meta, get_attr_value, is_param

from .infra import Pass, PassResult
from .insert_fake_quant import eval_constant
from .rewrite import Match, Rule, RuleSet, rewrite_graph

aten = torch.ops.aten
QAT_BN = meta.QAT_BN  # conv.meta: BnInfo (after CollapseConvBn), BnNodes (after ExpandConvBn)
BN_COUNTERS = meta.BN_COUNTERS.name  # the key's string, for qcompile.qat (reads gm.meta[BN_COUNTERS])


@dataclass(frozen=True)
class BnInfo:
    """A collapsed batch-norm: attribute targets (None when absent) and hyper-parameters."""

    gamma: str | None
    beta: str | None
    mean: str
    var: str
    training: bool
    momentum: float
    eps: float
    stack: dict | None = None


@dataclass(frozen=True)
class BnNodes:
    """Names of the expanded chain's nodes: scale factor, scaled weight, conv bias, batch-norm."""

    info: BnInfo
    sf: str
    weight: str
    bias: str | None
    bn: str


# ---------------------------------------------------------------------------- train / eval flags

# dropout-family overloads (x, p, train) -> the functional overload re-inserted after fake-quant
DROPOUT = {aten.dropout.default: aten.dropout.default, aten.dropout_.default: aten.dropout.default,
           aten.feature_dropout.default: aten.feature_dropout.default,
           aten.feature_dropout_.default: aten.feature_dropout.default,
           aten.alpha_dropout.default: aten.alpha_dropout.default,
           aten.feature_alpha_dropout.default: aten.feature_alpha_dropout.default}


def set_train_flags(gm: fx.GraphModule, dropout: bool, batch_norm: bool) -> bool:
    """Set the ``train`` flag of every dropout and the ``training`` flag of every batch-norm node.

    torch.export's training IR keeps ``aten.dropout(x, p, train)`` and ``aten.batch_norm(..., training,
    momentum, eps, cudnn)`` as single nodes, so switching mode is one argument per node (momentum and eps
    are kept, unlike pattern-rewriting approaches). Returns whether anything changed (then recompile)."""
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        index, value = (2, dropout) if node.target in DROPOUT else (5, batch_norm) \
            if node.target == aten.batch_norm.default else (None, None)
        if index is not None and bool(node.args[index]) != value:
            args = list(node.args)
            args[index] = value
            node.args = tuple(args)
            changed = True
    return changed


class StripBnCounters(Pass):
    """Remove ``num_batches_tracked.add_(1)``: the captured batch-norm bakes its momentum in, so the
    counter feeds nothing; the QAT model increments the buffers (listed in ``gm.meta``) itself."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        counters = meta.BN_COUNTERS.setdefault(gm, [])
        for node in list(gm.graph.nodes):
            if node.target != aten.add_.Tensor or not is_param(node.args[0]):
                continue
            if node.args[0].target.endswith("num_batches_tracked") and not node.users:
                counters.append(node.args[0].target)
                gm.graph.erase_node(node)
        return PassResult(gm, bool(counters))


def _map_input(node: fx.Node, fn) -> None:
    """Apply ``fn(position, input node)`` to every input of ``node`` (args then kwargs, nested)."""
    count = iter(range(1 << 30))
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: fn(next(count), n))
    node.args, node.kwargs = args, kwargs


class DetachDropout(Pass):
    """Remove dropout so the backend annotates the graph PTQ sees (eval mode has no dropout), keeping
    each consumer edge in ``gm.meta``; :class:`ReattachDropout` puts it back after fake-quantization,
    right in front of the consumer. The converted graph is then PTQ's, with no extra quantize step."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        record = meta.QAT_DROPOUTS.setdefault(gm, [])  # (consumer, input position, overload, p)
        for node in reversed(list(gm.graph.nodes)):  # consumers first: stacked dropouts stay in order
            if node.op != "call_function" or node.target not in DROPOUT:
                continue
            for user in list(node.users):
                def note(i, n, user=user, node=node):
                    if n is node:
                        record.append((user.name, i, DROPOUT[node.target], node.args[1]))
                    return n
                _map_input(user, note)
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        return PassResult(gm, bool(record))


class ReattachDropout(Pass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        record = meta.QAT_DROPOUTS.pop(gm, [])
        nodes = {n.name: n for n in gm.graph.nodes}
        for user_name, position, target, p in record:
            user = nodes[user_name]

            def insert(i, n, user=user, position=position, target=target, p=p):
                if i != position:
                    return n
                with gm.graph.inserting_before(user):
                    d = gm.graph.call_function(target, (n, p, True))
                copy_meta(n, d, keys=("val",))
                return d
            _map_input(user, insert)
        return PassResult(gm, bool(record))


def remove_dropout(gm: fx.GraphModule) -> bool:
    """Drop every dropout node (an eval-mode graph for convert)."""
    found = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in DROPOUT]
    for node in found:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    return bool(found)


# ---------------------------------------------------------------------------- collapse


def _bn_check(nodes) -> str | None:
    conv, bn = nodes
    if not is_param(conv.args[1]):
        return "weight is not a constant parameter"
    if bn.target != aten.batch_norm.default:
        return "not a training-IR batch_norm node"
    if not (is_param(bn.args[3]) and is_param(bn.args[4])):
        return "batch-norm without running statistics cannot be folded"
    if any(a is not None and not is_param(a) for a in bn.args[1:3]):
        return "batch-norm affine parameters are not constants"
    return None


def _target(node):
    return node.target if isinstance(node, fx.Node) else None


def _collapse(m: Match) -> bool:
    gm, (conv, bn) = m.ctx, m
    a = bn.args
    QAT_BN.set(conv, BnInfo(_target(a[1]), _target(a[2]), a[3].target, a[4].target, bool(a[5]),
                            float(a[6]), float(a[7]), bn.meta.get("nn_module_stack")))
    bn.replace_all_uses_with(conv)
    gm.graph.erase_node(bn)
    return True


# gemm -> batch_norm(training IR)  ->  gemm, with the batch-norm kept in conv.meta (BnInfo)
RULES = RuleSet([Rule(f"{op}_bn", (op, "batch_norm"), _bn_check, rewrite=_collapse)
                 for op in ("conv2d", "conv1d", "linear")])


class CollapseConvBn(Pass):
    """Remove each conv -> batch-norm pair's batch-norm from the graph, keeping it in ``conv.meta``."""

    def __init__(self, rules: RuleSet = RULES):
        self.rules = rules

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = rewrite_graph(gm, self.rules) > 0
        if modified:
            for node in list(gm.graph.nodes):
                if node.op == "get_attr" and not node.users:
                    gm.graph.erase_node(node)
        return PassResult(gm, modified)


# ---------------------------------------------------------------------------- expand


def _channel_shape(rank: int) -> list[int]:
    """Broadcast shape of a per-output-channel vector against an output of ``rank`` (channels on dim 1)."""
    return [1, -1] + [1] * (rank - 2)


class ExpandConvBn(Pass):
    """Re-insert each collapsed batch-norm with the scaled-weight QAT formulation (module docstring)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for conv in list(gm.graph.nodes):
            if isinstance(QAT_BN.get(conv), BnInfo):
                self._expand(gm, conv, QAT_BN.get(conv))
                modified = True
        return PassResult(gm, modified)

    def _expand(self, gm: fx.GraphModule, conv: fx.Node, info: BnInfo) -> None:
        g, call = gm.graph, gm.graph.call_function
        w_in = conv.args[1]  # the raw weight, or a fake-quant of it
        w = w_in.args[0] if w_in.op == "call_module" else w_in
        args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
        bias = args[2]
        attr = lambda t: None if t is None else g.get_attr(t)
        out_shape = _channel_shape(conv.meta["val"].dim())
        with g.inserting_before(w_in if w_in.op == "call_module" else conv):
            gamma, beta, mean, var = attr(info.gamma), attr(info.beta), attr(info.mean), attr(info.var)
            std = call(aten.sqrt.default, (call(aten.add.Tensor, (var, info.eps)),))
            sf = call(aten.div.Tensor, (gamma, std)) if gamma is not None else call(aten.reciprocal.default, (std,))
            w_shape = [-1] + [1] * (get_attr_value(gm, w).dim() - 1)
            scaled = call(aten.mul.Tensor, (w, call(aten.reshape.default, (sf, w_shape))))
            sf_out = call(aten.reshape.default, (sf, out_shape))
            bias_out = None if bias is None else call(aten.reshape.default, (bias, out_shape))
        if w_in.op == "call_module":
            w_in.args = (scaled,)
        args[1], args[2] = (w_in if w_in.op == "call_module" else scaled), None
        conv.args = tuple(args)
        users, node = list(conv.users), conv
        steps = [(aten.div.Tensor, lambda y: (y, sf_out))]
        if bias_out is not None:
            steps.append((aten.add.Tensor, lambda y: (y, bias_out)))
        steps.append((aten.batch_norm.default, lambda y: (y, gamma, beta, mean, var, info.training,
                                                          info.momentum, info.eps, False)))
        for target, make_args in steps:
            with g.inserting_after(node):
                node = call(target, make_args(node))
            copy_meta(conv, node)
        if info.stack is not None:
            node.meta["nn_module_stack"] = info.stack
        for u in users:
            u.replace_input_with(conv, node)
        QAT_BN.set(conv, BnNodes(info, sf.name, scaled.name, _target(bias), node.name))


# ---------------------------------------------------------------------------- fold (convert)


class FoldConvBn(Pass):
    """On an eval-mode copy: fold each expanded chain into the conv (constants for ``w * sf`` and
    ``(b - mean) * sf + beta``); the weight fake-quant, if any, keeps its place in front of the weight."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        modified = False
        for conv in list(gm.graph.nodes):
            rec = QAT_BN.get(conv)
            if not isinstance(rec, BnNodes):
                continue
            self._fold(gm, conv, rec, nodes)
            QAT_BN.pop(conv)
            modified = True
        if modified:
            gm.graph.eliminate_dead_code()
            for node in list(gm.graph.nodes):
                if node.op == "get_attr" and not node.users:
                    gm.graph.erase_node(node)
        return PassResult(gm, modified)

    def _fold(self, gm, conv: fx.Node, rec: BnNodes, nodes: dict) -> None:
        info, scaled, bn = rec.info, nodes[rec.weight], nodes[rec.bn]
        sf = eval_constant(gm, nodes[rec.sf])
        mean, beta, b = _param(gm, info.mean), _param(gm, info.beta), _param(gm, rec.bias)
        bias = ((b if b is not None else 0.0) - mean) * sf + (beta if beta is not None else 0.0)
        w_fold = add_constant(gm, f"{conv.name}_weight_folded", eval_constant(gm, scaled), scaled)
        scaled.replace_all_uses_with(w_fold)
        args = list(conv.args)
        args[2] = add_constant(gm, f"{conv.name}_bias_folded", bias, conv)
        conv.args = tuple(args)
        bn.replace_all_uses_with(conv)


def _param(gm: fx.GraphModule, target: str | None):
    """The tensor at attribute path ``target`` of ``gm`` (None for None)."""
    if target is None:
        return None
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach()
