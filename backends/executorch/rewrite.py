"""Rewrites of the reference copy that keep XNNPACK's delegate valid (values unchanged).

* ``cat`` whose output is quantized: XNNPACK's int8 concatenate needs ONE scale / zero point for every
  input and the output, and ExecuTorch 1.5.1's ``CatConfig`` does not check it (the program is built,
  then fails to load: ``XNNCompiler: Failed to create cat node ... xnn_status_invalid_parameter``). Each
  input is re-quantized to the output's parameters first. Exact: quantization is elementwise, so
  ``quantize(cat(a, b)) == cat(quantize(a), quantize(b))`` code for code.
* ``chunk`` / ``split`` / ``split_with_sizes`` -> one ``slice`` per piece: ExecuTorch's portable
  ``split_with_sizes_copy`` rejects a channels-last input coming out of the delegate ("2 input tensors
  have different dim orders", execute() error 0x12); XNNPACK runs slices itself, in any layout.
* ``reshape`` of a transposed tensor gets an explicit ``clone`` (contiguous) first. torch.export records a
  reshape as a ``view`` when the example's strides allow it, and ExecuTorch's decompositions can then
  produce other strides (CPU SDPA returns a [B, S, H, D]-ordered output; its decomposition does not), so
  the view fails in ``to_edge`` (GPT-2: "Cannot view a tensor with shape [2, 8, 64] and strides
  (64, 128, 1)"). The clone makes the layout explicit; XNNPACK drops it again where it is an identity.
* a constant ``pad`` of a dequantized tensor whose result stays float (BiT's stem: conv -> pad -> max-pool ->
  GroupNorm) is re-quantized with its input's parameters. XNNPACK takes the dequantize into the pad's
  input, so the pad reads int8 and writes fp32, and its runtime rejects the program at load time
  (``Failed to create StaticConstantPad node ... xnn_status_invalid_parameter``). Exact when the pad
  value lies on the input's grid (0.0 always does: the zero point is an integer in range); a value off
  the grid is left alone.
* ``max.dim`` on a 4-D tensor: ExecuTorch 1.5.1's partitioner takes every one, and its XNNPACK
  serializer then accepts only ``keepdim=True`` over dim 2 or 3 and raises in ``to_edge_transform_and_lower``
  (Hiera's mask-unit pooling: "amax.default only supports keep_dim == True"). Over dim 2 / 3 it becomes
  ``max.dim(keepdim=True)`` + ``squeeze`` (delegated); over dim 0 / 1 ``amax`` (portable kernel).
"""
from __future__ import annotations

import copy
import operator

import torch
from torch import fx

from qcompile.ir import constant_pad_value
from qcompile.passes.rewrite import Match, Rule, RuleSet, rewritten

qd, aten = torch.ops.quantized_decomposed, torch.ops.aten
_TRANSPOSES = (aten.permute.default, aten.transpose.int, aten.t.default)
_SPLITS = (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.split.sizes)
_KEEP = ("custom", "nn_module_stack", "stack_trace")


def _meta_from(src: fx.Node, *nodes: fx.Node) -> None:
    for n in nodes:
        n.meta.update({k: v for k, v in src.meta.items() if k in _KEEP})


def _quantized_cat(node: fx.Node) -> bool:
    users = list(node.users)
    return node.target == aten.cat.default and len(users) == 1 and users[0].target == qd.quantize_per_tensor.default


def _requantize_cat(m: Match):
    """Quantize each cat input with the output's parameters unless it already is; None when none changed."""
    gm, cat = m.ctx, m.anchor
    qparams = tuple(m.user.args[1:])
    inputs = list(cat.args[0])
    for i, x in enumerate(inputs):
        if isinstance(x, fx.Node) and x.target == qd.dequantize_per_tensor.default and tuple(x.args[1:]) == qparams:
            continue
        with gm.graph.inserting_before(cat):
            q = gm.graph.call_function(qd.quantize_per_tensor.default, (x, *qparams))
            dq = gm.graph.call_function(qd.dequantize_per_tensor.default, (q, *qparams))
        _meta_from(cat, q, dq)
        if isinstance(x, fx.Node) and "val" in x.meta:
            dq.meta["val"] = x.meta["val"]
        inputs[i] = dq
    if inputs == list(cat.args[0]):
        return None
    cat.args = (inputs, *cat.args[1:])
    return True


def _split_bounds(node: fx.Node) -> tuple[int, list[tuple[int, int]]] | None:
    """(dim, [(start, end) per piece]) of a chunk / split with static sizes, from the node's output shapes."""
    vals = node.meta.get("val")
    if not isinstance(vals, (list, tuple)) or not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    rank = vals[0].dim()
    dim = dim % rank
    bounds, start = [], 0
    for v in vals:
        size = v.shape[dim]
        if not isinstance(size, int):
            return None
        bounds.append((start, start + size))
        start += size
    return dim, bounds


def _static_split(node: fx.Node) -> bool:
    return (node.target in _SPLITS and _split_bounds(node) is not None
            and all(u.target is operator.getitem for u in node.users))


def _as_slices(m: Match) -> bool:
    gm, node = m.ctx, m.anchor
    dim, bounds = _split_bounds(node)
    for item in list(node.users):
        start, end = bounds[item.args[1]]
        with gm.graph.inserting_before(item):
            piece = gm.graph.call_function(aten.slice.Tensor, (node.args[0], dim, start, end))
        piece.meta = copy.copy(item.meta)
        _meta_from(node, piece)
        item.replace_all_uses_with(piece)
        gm.graph.erase_node(item)
    gm.graph.erase_node(node)
    return True


def _reshape_of_transposed(node: fx.Node) -> bool:
    src = node.args[0] if node.args else None
    return node.target in (aten.reshape.default, aten.view.default) and isinstance(src, fx.Node) \
        and src.target in _TRANSPOSES


def _clone_first(m: Match) -> bool:
    gm, node = m.ctx, m.anchor
    src = node.args[0]
    with gm.graph.inserting_before(node):
        clone = gm.graph.call_function(aten.clone.default, (src,), {"memory_format": torch.contiguous_format})
    _meta_from(src, clone)
    if "val" in src.meta:
        clone.meta["val"] = src.meta["val"]
    node.replace_input_with(src, clone)
    return True


def _pad_value_on_grid(node: fx.Node) -> bool:
    value = constant_pad_value(node)
    if value is None:
        return False
    scale, zp, qmin, qmax = (float(a) for a in node.args[0].args[1:5])
    code = value / scale + zp
    return abs(code - round(code)) < 1e-6 and qmin <= round(code) <= qmax


def _float_pad_of_dequantized(node: fx.Node) -> bool:
    src = node.args[0] if node.args else None
    return (node.target in (aten.pad.default, aten.constant_pad_nd.default) and isinstance(src, fx.Node)
            and src.target == qd.dequantize_per_tensor.default and len(src.args) >= 6
            and not any(u.target == qd.quantize_per_tensor.default for u in node.users)
            and _pad_value_on_grid(node))


def _requantize_pad(m: Match) -> bool:
    gm, pad = m.ctx, m.anchor
    qparams = tuple(pad.args[0].args[1:])
    users = list(pad.users)
    with gm.graph.inserting_after(pad):
        q = gm.graph.call_function(qd.quantize_per_tensor.default, (pad, *qparams))
    with gm.graph.inserting_after(q):
        dq = gm.graph.call_function(qd.dequantize_per_tensor.default, (q, *qparams))
    _meta_from(pad, q, dq)
    if "val" in pad.meta:
        dq.meta["val"] = pad.meta["val"]
    for u in users:
        u.replace_input_with(pad, dq)
    return True


def _max_dim_xnnpack_rejects(node: fx.Node) -> bool:
    if node.target != aten.max.dim or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    val = node.args[0].meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        return False
    live = [u for u in node.users if u.users]  # torch.export leaves an unused getitem(1) behind
    if not live or not all(u.target is operator.getitem and u.args[1] == 0 for u in live):
        return False  # the partitioner declines a max.dim whose indices are used
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs["dim"]) % 4
    keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    return not (keepdim and dim in (2, 3))


def _max_dim_as_delegable(m: Match) -> bool:
    gm, node = m.ctx, m.anchor
    x = node.args[0]
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs["dim"]) % 4
    keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    for item in [u for u in node.users if not u.users]:
        gm.graph.erase_node(item)
    for item in list(node.users):
        with gm.graph.inserting_before(item):
            if dim in (2, 3):
                kept = gm.graph.call_function(aten.max.dim, (x, dim, True))
                values = gm.graph.call_function(operator.getitem, (kept, 0))
                new = gm.graph.call_function(aten.squeeze.dims, (values, [dim]))
                _meta_from(node, kept, values)
            else:
                new = gm.graph.call_function(aten.amax.default, (x, [dim], keepdim))
        _meta_from(node, new)
        if "val" in item.meta:
            new.meta["val"] = item.meta["val"]
        item.replace_all_uses_with(new)
        gm.graph.erase_node(item)
    gm.graph.erase_node(node)
    return True


# cat(x, dq(q(y, s'))) -> q(s)  ->  cat(dq(q(x, s)), dq(q(y, s))) -> q(s): one scale for XNNPACK's concatenate
CAT_RULES = RuleSet([Rule("requantize_cat_inputs", (_quantized_cat,), rewrite=_requantize_cat)])
# split(x) -> getitem(i)  ->  slice(x, dim, start_i, end_i)
SPLIT_RULES = RuleSet([Rule("split_as_slices", (_static_split,), rewrite=_as_slices)])
# reshape(transpose(x))  ->  reshape(clone(transpose(x), contiguous_format))
RESHAPE_RULES = RuleSet([Rule("clone_before_reshape_of_transposed", (_reshape_of_transposed,), rewrite=_clone_first)])
# pad(dq(q(x, s)), 0.0) -> float  ->  dq(q(pad(dq(q(x, s))), s)): the pad reads and writes int8
PAD_RULES = RuleSet([Rule("requantize_float_pad", (_float_pad_of_dequantized,), rewrite=_requantize_pad)])
# max.dim(x4d, d, keepdim) -> squeeze(max.dim(x, d, True)[0], d) for d in (2, 3), else amax(x, [d], keepdim)
MAX_DIM_RULES = RuleSet([Rule("max_dim_for_xnnpack", (_max_dim_xnnpack_rejects,), rewrite=_max_dim_as_delegable)])


def _apply(gm: fx.GraphModule, rules: RuleSet) -> list[str]:
    done = rewritten(gm, rules)
    if done:
        gm.recompile()
    return done


def requantize_cat_inputs(gm: fx.GraphModule) -> list[str]:
    """Give every input of a quantized-output cat the output's quantization parameters."""
    return _apply(gm, CAT_RULES)


def splits_as_slices(gm: fx.GraphModule) -> list[str]:
    """chunk / split -> getitem(i) becomes slice(x, dim, start_i, end_i)."""
    return _apply(gm, SPLIT_RULES)


def clone_before_reshape_of_transposed(gm: fx.GraphModule) -> list[str]:
    """reshape(transpose(x)) -> reshape(clone(transpose(x), contiguous_format))."""
    return _apply(gm, RESHAPE_RULES)


def requantize_float_pads(gm: fx.GraphModule) -> list[str]:
    """A constant pad of a dequantized tensor, left float, re-quantized with its input's parameters."""
    return _apply(gm, PAD_RULES)


def max_dim_for_xnnpack(gm: fx.GraphModule) -> list[str]:
    """4-D ``max.dim`` in the form XNNPACK serializes (dim 2 / 3, keepdim) or as ``amax`` (not delegated)."""
    return _apply(gm, MAX_DIM_RULES)
