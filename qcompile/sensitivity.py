"""Where quantization noise enters: per-node SQNR of the reference graph against the float graph."""
from __future__ import annotations

import torch
from torch import fx

from . import meta
from .ir import module_path, record_values
from .qparams import sqnr

qd = torch.ops.quantized_decomposed


def node_sqnr(float_gm: fx.GraphModule, reference: fx.GraphModule, args, kwargs=None) -> list[dict]:
    """SQNR (dB) of every quantized value of the reference graph against the same float value."""
    flat = torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs or {})))[0]
    quantized = {n.args[0].name: n for n in reference.graph.nodes if n.target == qd.quantize_per_tensor.default}
    dq_of = {q.name: next(iter(q.users)).name for q in quantized.values() if q.users}
    f_values = record_values(float_gm, flat, quantized)
    r_values = record_values(reference, flat, dq_of.values())
    smoothed = meta.SMOOTHQUANT_SCALES.get(reference, {})  # passes/smoothquant.py: x / s
    rows = []
    for name, q in quantized.items():
        dq = dq_of.get(q.name)
        fv, rv = f_values.get(name), r_values.get(dq)
        if name in smoothed and isinstance(rv, torch.Tensor):
            rv = rv * smoothed[name]  # compare in the float model's units
        if isinstance(fv, torch.Tensor) and isinstance(rv, torch.Tensor) and fv.shape == rv.shape:
            rows.append({"value": name, "module": module_path(q.args[0]),
                         "sqnr_db": round(sqnr(fv.float(), rv.float()), 2)})
    return rows
