"""ATen -> ONNX for shape, indexing and tensor-creation ops (Reshape, Transpose, Slice, Gather, Range...).

Shapes keep the batch symbolic: literal sizes go through ``Emitter.shape_value`` and symbolic sizes
(``sym_size``) become 1-D int64 tensors computed with ``Shape``.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx

from qcompile.errors import UnsupportedError, where
from qcompile.ir import module_path

from .emit import TORCH_TO_ONNX
from .ops import OpEntry, arg, axes, rank, weight_info
from .ops import val as _val

aten = torch.ops.aten
INT64_MAX = 2**63 - 1


def reshape(em, node):
    return em.add("Reshape", [em.value(node.args[0]), em.shape_value(node, list(node.args[1]))], node)


def flatten(em, node):
    x, start, end = node.args[0], int(arg(node, 1, "start_dim", 0)), int(arg(node, 2, "end_dim", -1))
    r = rank(x)
    if start % r == 1 and end % r == r - 1:
        return em.add("Flatten", [em.value(x)], node, axis=1)
    return em.add("Reshape", [em.value(x), em.shape_value(node, list(_val(node).shape))], node)


def permute(em, node):
    return em.add("Transpose", [em.value(node.args[0])], node, perm=[d % rank(node) for d in node.args[1]])


def transpose(em, node):
    r = rank(node)
    perm = list(range(r))
    a, b = int(node.args[1]) % r, int(node.args[2]) % r
    perm[a], perm[b] = perm[b], perm[a]
    return em.add("Transpose", [em.value(node.args[0])], node, perm=perm)


def t(em, node):
    return em.add("Transpose", [em.value(node.args[0])], node, perm=[1, 0])


def unsqueeze(em, node):
    d = int(node.args[1]) % rank(node)
    return em.add("Unsqueeze", [em.value(node.args[0]), em.ints([d], "axes")], node)


def squeeze(em, node):
    x = node.args[0]
    dims = arg(node, 1, "dim", None)
    if dims is None:
        return em.add("Squeeze", [em.value(x)], node)
    keep = [a for a in axes(dims, rank(x)) if _val(x).shape[a] == 1]
    return em.add("Squeeze", [em.value(x), em.ints(keep, "axes")], node) if keep else em.value(x)


def cat(em, node):
    tensors = [t for t in node.args[0] if not (_val(t) is not None and _val(t).numel() == 0)]
    axis = int(arg(node, 1, "dim", 0)) % rank(node)
    return em.add("Concat", [em.value(t) for t in tensors], node, axis=axis)


def slice_(em, node):
    x, dim = node.args[0], int(arg(node, 1, "dim", 0))
    start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    start = 0 if start is None else start
    end = INT64_MAX if end is None or (isinstance(end, int) and end >= INT64_MAX // 2) else end
    parts = [em.ints([int(v)]) if isinstance(v, int) else em._sym(v) for v in (start, end)]
    return em.add("Slice", [em.value(x), *parts, em.ints([dim % rank(x)]), em.ints([int(step)])], node)


def select(em, node):
    x, dim, index = node.args[0], int(node.args[1]), node.args[2]
    idx = em.init(np.asarray(int(index), dtype=np.int64), "index")
    return em.add("Gather", [em.value(x), idx], node, axis=dim % rank(x))


def expand(em, node):
    x, sizes = node.args[0], list(node.args[1])
    sizes = [1 if isinstance(s, int) and s == -1 else s for s in sizes]
    return em.add("Expand", [em.value(x), em.shape_value(node, sizes)], node)


def embedding(em, node):
    """Gather rows. An int8 table (weight DQ per-tensor or per hidden column) is gathered *before*
    dequantizing: Gather(int8 table) -> DequantizeLinear on the gathered rows only."""
    table, ids = node.args[0], node.args[1]
    if isinstance(table, fx.Node) and table.name in em.lazy:
        q, s, z, axis = weight_info(em, table)
        if axis in (None, 1):
            path = module_path(node) or node.name
            qi = em.init(q, f"{path}.weight", share=False)
            shape = (-1,) if axis is not None else ()
            si = em.init(s.reshape(shape), f"{path}.weight:scale", dtype=torch.float32, share=False)
            zi = em.init(z.reshape(shape), f"{path}.weight:zero_point", dtype=q.dtype, share=False)
            for init, role, n in ((qi, "codes", q.numel()), (si, "scales", 0), (zi, "zero_points", 0)):
                em.tag(init, node.name, role, n)
            rows = em.add("Gather", [qi, em.value(ids)], node, suffix="/gather_int8", axis=0)
            attrs = {"axis": rank(node) - 1} if axis is not None else {}
            out = em.add("DequantizeLinear", [rows, si, zi], node, **attrs)
            em.out.weights[out] = table.name
            return out
    return em.add("Gather", [em.value(table), em.value(ids)], node, axis=0)


def gather(em, node):
    return em.add("GatherElements", [em.value(node.args[0]), em.value(node.args[2])], node,
                  axis=int(node.args[1]) % rank(node))


def index(em, node):
    """x[i0, i1, ...] with index tensors for the leading dims -> GatherND on the broadcast indices."""
    x, indices = node.args[0], node.args[1]
    if any(i is None for i in indices):
        raise UnsupportedError(f"onnx backend: {where(node)}: indexing with None/slices is not mapped")
    consts = [em.const_of(i) for i in indices]
    if all(c is not None for c in consts):
        b = torch.broadcast_tensors(*[c.long() for c in consts])
        return em.add("GatherND", [em.value(x), em.init(torch.stack(b, dim=-1), "index")], node)
    vals = [em.value(i) for i in indices]
    zero = em.init(np.asarray(0, dtype=np.int64), "zero")
    acc = em.add("Mul", [vals[0], zero], node, suffix="/bcast0")
    for k, v in enumerate(vals[1:], 1):  # broadcast every index to the common shape: i_k + sum(0 * i_j)
        acc = em.add("Add", [acc, em.add("Mul", [v, zero], node, suffix=f"/zero{k}")], node, suffix=f"/bcast{k}")
    last = em.ints([-1], "axes")
    cols = [em.add("Unsqueeze", [em.add("Add", [v, acc], node, suffix=f"/idx{k}"), last], node, suffix=f"/col{k}")
            for k, v in enumerate(vals)]
    idx = em.add("Concat", cols, node, suffix="/indices", axis=-1)
    return em.add("GatherND", [em.value(x), idx], node)


def arange(em, node):
    """arange(end) / arange(start, end[, step]) -> Range (bounds may be symbolic sizes)."""
    vals = list(node.args) + ([] if len(node.args) > 1 else [])
    start, end, step = (0, vals[0], 1) if len(vals) == 1 else (vals[0], vals[1], vals[2] if len(vals) > 2 else 1)
    dtype = _val(node).dtype
    parts = []
    for v in (start, end, step):
        if isinstance(v, fx.Node):
            sq = em.add("Squeeze", [em._sym(v)], node, suffix=f"/{v.name}_scalar")
            parts.append(sq if dtype == torch.int64 else
                         em.add("Cast", [sq], node, suffix=f"/{v.name}_cast", to=TORCH_TO_ONNX[dtype]))
        else:
            parts.append(em.init(np.asarray(v), "range", dtype=dtype))
    return em.add("Range", parts, node)


def full_like(value=None):
    def emit(em, node):
        v = value if value is not None else node.args[1]
        out = _val(node)
        fill = torch.tensor([v], dtype=out.dtype)
        shape = em.add("Shape", [em.value(node.args[0])], node, suffix="/shape")
        return em.add("ConstantOfShape", [shape], node, value=_tensor_attr(fill))
    return emit


def new_full(value=None):
    def emit(em, node):
        v = value if value is not None else node.args[2]
        out = _val(node)
        fill = torch.tensor([v], dtype=out.dtype)
        return em.add("ConstantOfShape", [em.shape_value(node, list(node.args[1]))], node, value=_tensor_attr(fill))
    return emit


def _tensor_attr(t: torch.Tensor):
    from onnx import numpy_helper
    return numpy_helper.from_array(t.numpy(), "value")


def sym_size(em, node):
    d = int(node.args[1])
    return em.add("Shape", [em.value(node.args[0])], node, start=d, end=d + 1)


def getitem(em, node):
    src, i = node.args
    vals = em.env[src.name]
    if not isinstance(vals, (list, tuple)) or vals[i] is None:
        raise UnsupportedError(f"onnx backend: {where(node)}: output {i} of {src.name} is not available in ONNX")
    return vals[i]


def constant_pad(em, node):
    x, pad, value = node.args[0], list(node.args[1]), float(arg(node, 2, "value", 0.0))
    r = rank(x)
    begins, ends = [0] * r, [0] * r
    for k in range(len(pad) // 2):
        begins[r - 1 - k], ends[r - 1 - k] = pad[2 * k], pad[2 * k + 1]
    return em.add("Pad", [em.value(x), em.ints(begins + ends, "pads"), em.scalar_like(value, node)], node)


def split(em, node):
    x, sizes, dim = node.args[0], node.args[1], int(arg(node, 2, "dim", 0))
    r = rank(x)
    total = _val(x).shape[dim % r]
    if isinstance(sizes, int):
        sizes = [sizes] * (total // sizes) + ([total % sizes] if total % sizes else [])
    return em.add("Split", [em.value(x), em.ints(sizes, "split")], node, n_out=len(sizes), axis=dim % r)


def sym_binary(op: str):
    def emit(em, node):
        return em.add(op, [em._sym(a) if isinstance(a, fx.Node) else em.ints([int(a)]) for a in node.args], node)
    return emit


_E = OpEntry
SHAPE_OPS = {
    aten.view.default: _E(reshape, "Reshape"), aten.reshape.default: _E(reshape, "Reshape"),
    aten._unsafe_view.default: _E(reshape, "Reshape"),
    aten.flatten.using_ints: _E(flatten, "Flatten"),
    aten.permute.default: _E(permute, "Transpose"), aten.transpose.int: _E(transpose, "Transpose"),
    aten.t.default: _E(t, "Transpose"),
    aten.unsqueeze.default: _E(unsqueeze, "Unsqueeze"),
    aten.squeeze.dim: _E(squeeze, "Squeeze"), aten.squeeze.dims: _E(squeeze, "Squeeze"),
    aten.squeeze.default: _E(squeeze, "Squeeze"),
    aten.cat.default: _E(cat, "Concat"),
    aten.slice.Tensor: _E(slice_, "Slice"), aten.select.int: _E(select, "Gather"),
    aten.expand.default: _E(expand, "Expand"),
    aten.embedding.default: _E(embedding, "Gather"),
    aten.gather.default: _E(gather, "GatherElements"),
    aten.index.Tensor: _E(index, "GatherND"),
    aten.ones_like.default: _E(full_like(1), "ConstantOfShape"),
    aten.zeros_like.default: _E(full_like(0), "ConstantOfShape"),
    aten.full_like.default: _E(full_like(), "ConstantOfShape"),
    aten.new_ones.default: _E(new_full(1), "ConstantOfShape"),
    aten.new_zeros.default: _E(new_full(0), "ConstantOfShape"),
    aten.new_full.default: _E(new_full(), "ConstantOfShape"),
    aten.constant_pad_nd.default: _E(constant_pad, "Pad"),
    aten.split.Tensor: _E(split, "Split"), aten.split_with_sizes.default: _E(split, "Split"),
    aten.sym_size.int: _E(sym_size, "Shape"),
    aten.arange.default: _E(arange, "Range"), aten.arange.start: _E(arange, "Range"),
    aten.arange.start_step: _E(arange, "Range"),
    operator.getitem: _E(getitem, "(output)"),
    operator.mul: _E(sym_binary("Mul"), "Mul"), operator.add: _E(sym_binary("Add"), "Add"),
    operator.sub: _E(sym_binary("Sub"), "Sub"), operator.floordiv: _E(sym_binary("Div"), "Div"),
}
