"""Where quantization noise enters: per-node SQNR of the reference graph against the float graph."""
from __future__ import annotations

import torch
from torch import fx

from .ir import module_path
from .qparams import sqnr

qd = torch.ops.quantized_decomposed


class _Record(fx.Interpreter):
    def __init__(self, gm, names=None):
        super().__init__(gm)
        self.names, self.values = names, {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and (self.names is None or n.name in self.names):
            self.values[n.name] = out
        return out


def node_sqnr(float_gm: fx.GraphModule, reference: fx.GraphModule, args, kwargs=None) -> list[dict]:
    """SQNR (dB) of every quantized value of the reference graph against the same float value."""
    flat = torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs or {})))[0]
    quantized = {n.args[0].name: n for n in reference.graph.nodes if n.target == qd.quantize_per_tensor.default}
    dq_of = {q.name: next(iter(q.users)).name for q in quantized.values() if q.users}
    with torch.no_grad():
        f = _Record(float_gm, set(quantized))
        f.run(*flat)
        r = _Record(reference, set(dq_of.values()))
        r.run(*flat)
    rows = []
    for name, q in quantized.items():
        dq = dq_of.get(q.name)
        if name in f.values and dq in r.values and f.values[name].shape == r.values[dq].shape:
            rows.append({"value": name, "module": module_path(q.args[0]),
                         "sqnr_db": round(sqnr(f.values[name].float(), r.values[dq].float()), 2)})
    return rows
