"""Dynamic and weight-only modes: the annotation fix-up and their reference-graph vocabulary.

In these modes a claimed linear computes and returns float: only its weight (and, in dynamic
mode, its activation input at run time) is quantized. The reference graph says so with
standard ops where they exist:

* dynamic per-token activations:  ``choose_qparams_per_token[_asymmetric] -> quantize_per_token ->
  dequantize_per_token``; per-tensor: ``choose_qparams.tensor -> quantize_per_tensor.tensor ->
  dequantize_per_tensor.tensor`` (parameters computed from each tensor when the graph runs);
* NF4 weights: packed codes ``-> qcompile::dequantize_nf4`` (scales through
  ``qcompile::dequantize_scales`` when double-quantized), see ``qcompile.lowbit``;
* LSTM / GRU: the op keeps its parameter list, whose weight matrices become int constants ->
  ``dequantize_per_channel`` (their activations are quantized inside the kernel's gate GEMMs).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from qcompile import meta
from qcompile import annotation as A
from qcompile.ir import add_constant, copy_meta, get_attr_value
from qcompile.lowbit import NF4Params, nf4_params, nf4_quantize, pack_int4
from qcompile.observers import weight_qparams
from qcompile.ops import op_kind
from qcompile.qparams import quantize
from qcompile.specs import NF4Spec, QuantSpec

from .infra import Pass, PassResult

qd = torch.ops.quantized_decomposed
qc = torch.ops.qcompile


class FloatOutputGroups(Pass):
    """Claimed groups of the dynamic / weight-only tables keep a float output: drop output specs
    (nothing to observe) and keep the int8 status even when the group feeds the model output."""

    def __init__(self, notes: dict[str, str], mode: str, op_notes: dict[str, str]):
        self.notes = notes  # pattern name -> what the user reads in the report
        self.mode, self.op_notes = mode, op_notes

    def call(self, gm: fx.GraphModule) -> PassResult:
        for node in gm.graph.nodes:
            ann = A.get_annotation(node)
            if ann is None:
                continue
            if ann.pattern in self.notes and ann.status in (A.INT8, A.FLOAT_OUTPUT):
                A.set_annotation(node, ann.with_(output_spec=None, status=A.INT8, reason=self.notes[ann.pattern]))
            elif ann.status == A.FLOAT_UNSUPPORTED and op_kind(node) not in self.op_notes:
                A.set_annotation(node, ann.with_(reason=f"float in mode={self.mode!r}, which quantizes the weights of "
                                                        f"{' / '.join(sorted(set(self.notes)))} only"))
        return PassResult(gm, True)


def _chain(spec: QuantSpec):
    """(choose op, its extra args, quantize op, dequantize op, dequantize extra args)."""
    if spec.granularity == "per_token":
        choose = qd.choose_qparams_per_token.default if spec.symmetric else \
            qd.choose_qparams_per_token_asymmetric.default
        return (choose, (spec.dtype,), qd.quantize_per_token.default, qd.dequantize_per_token.default,
                (torch.float32,))
    choose = qd.choose_qparams_symmetric.tensor if spec.symmetric else qd.choose_qparams.tensor
    eps = float(torch.finfo(torch.float32).eps)
    return (choose, (spec.quant_min, spec.quant_max, eps, spec.dtype), qd.quantize_per_tensor.tensor,
            qd.dequantize_per_tensor.tensor, ())


def insert_dynamic_qdq(gm: fx.GraphModule, node: fx.Node, index: int, spec: QuantSpec, cache: dict) -> None:
    """Quantize ``node.args[index]`` at run time: choose parameters -> quantize -> dequantize.
    ``cache`` shares one chain between the users of the same value (Q, K and V read one input)."""
    x = node.args[index]
    key = (x.name, spec)
    if key not in cache:
        choose, cargs, quant, dequant, dargs = _chain(spec)
        with gm.graph.inserting_after(x):
            c = gm.graph.call_function(choose, (x, *cargs))
        with gm.graph.inserting_after(c):
            s = gm.graph.call_function(operator.getitem, (c, 0))
        with gm.graph.inserting_after(s):
            z = gm.graph.call_function(operator.getitem, (c, 1))
        qargs = (spec.quant_min, spec.quant_max, spec.dtype)
        with gm.graph.inserting_after(z):
            q = gm.graph.call_function(quant, (x, s, z, *qargs))
        with gm.graph.inserting_after(q):
            dq = gm.graph.call_function(dequant, (q, s, z, *qargs, *dargs))
        for n in (c, s, z, q, dq):
            copy_meta(x, n, keys=("nn_module_stack", "stack_trace"))
        copy_meta(x, dq, keys=("val",))
        cache[key] = dq
    node.update_arg(index, cache[key])


def insert_nf4_weight(gm: fx.GraphModule, node: fx.Node, index: int, spec: NF4Spec, params=None) -> None:
    """Replace the 2-D weight constant ``node.args[index]`` by packed NF4 codes -> ``qcompile::dequantize_nf4``.
    ``params``: precomputed :class:`NF4Params` (GPTQ), else the per-group absmax of the weight."""
    w_node = node.args[index]
    w = get_attr_value(gm, w_node).detach().float()
    if w.dim() != 2:
        raise ValueError(f"{node.name}: NF4 weights must be 2-D, got shape {tuple(w.shape)}")
    p = params if isinstance(params, NF4Params) else nf4_params(w, spec.group_size, spec.double_quant,
                                                                 spec.scale_block)
    packed = add_constant(gm, f"{node.name}_weight_nf4", pack_int4(nf4_quantize(w, p)), node)
    with gm.graph.inserting_before(node):
        if p.scale_codes is not None:
            consts = [add_constant(gm, f"{node.name}_weight_{n}", t, node)
                      for n, t in (("scale_codes", p.scale_codes), ("scale_step", p.scale_scale),
                                   ("scale_offset", p.scale_offset))]
            absmax = gm.graph.call_function(qc.dequantize_scales.default, (*consts, p.scale_block))
        else:
            absmax = add_constant(gm, f"{node.name}_weight_absmax", p.absmax, node)
        dq = gm.graph.call_function(qc.dequantize_nf4.default, (packed, absmax, p.group_size))
    copy_meta(w_node, dq, keys=("val",))
    node.update_arg(index, dq)


# -- recurrent layers (LSTM / GRU): one ATen op holding a list of weight matrices -------------------
RNN_OPS = (torch.ops.aten.lstm.input, torch.ops.aten.gru.input)


class AnnotateRecurrent(Pass):
    """Claim ``aten.lstm`` / ``aten.gru`` for dynamic int8 (their gate GEMMs quantize activations at run
    time inside the kernel): int8 status, and the weight spec in ``meta.RNN_WEIGHT_SPEC`` for convert."""

    def __init__(self, config, weight_spec, note: str):
        self.config, self.weight_spec, self.note = config, weight_spec, note

    def call(self, gm: fx.GraphModule) -> PassResult:
        from qcompile.config import resolve
        modified = False
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in RNN_OPS:
                continue
            mc, kind = resolve(self.config, node), node.target.__name__.split(".")[0]
            if mc is None:
                A.set_annotation(node, A.Annotation(status=A.FLOAT_EXCLUDED, reason="excluded by the user's config"))
            elif not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in node.args[2]):
                A.set_annotation(node, A.Annotation(status=A.FLOAT_UNSUPPORTED, reason=f"{kind}: weights are not constants"))
            else:
                A.set_annotation(node, A.Annotation(status=A.INT8, reason=self.note, group=node.name,
                                                    pattern=f"{kind}_dynamic"))
                meta.RNN_WEIGHT_SPEC.set(node, self.weight_spec(mc.weights, None, node))
            modified = True
        return PassResult(gm, modified)


def quantize_recurrent_weights(gm: fx.GraphModule, node: fx.Node, spec: QuantSpec) -> None:
    """Weight matrices of the op's parameter list -> int constants -> dequantize (biases stay float)."""
    stride = 4 if node.args[3] else 2  # (w_ih, w_hh[, b_ih, b_hh]) per layer and direction
    params = list(node.args[2])
    for j, p in enumerate(params):
        if j % stride >= 2:
            continue
        w = get_attr_value(gm, p).detach().float()
        qp = weight_qparams(w, spec)
        consts = [add_constant(gm, f"{node.name}_w{j}_{n}", t, node)
                  for n, t in (("int", quantize(w, qp)), ("scale", qp.scale.float().reshape(-1)),
                               ("zp", qp.zero_point.reshape(-1).to(torch.int64)))]
        if qp.axis is None:  # per-tensor: one scale per matrix, expressed per channel
            consts[1:] = [add_constant(gm, f"{node.name}_w{j}_{n}", t.expand(w.shape[0]).contiguous(), node)
                          for n, t in (("scale_rows", qp.scale.float().reshape(1)),
                                       ("zp_rows", qp.zero_point.reshape(1).to(torch.int64)))]
        with gm.graph.inserting_before(node):
            params[j] = gm.graph.call_function(qd.dequantize_per_channel.default,
                                               (*consts, 0, qp.quant_min, qp.quant_max, qp.dtype))
        copy_meta(p, params[j], keys=("val",))
    node.update_arg(2, params)
