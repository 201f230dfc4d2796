"""Layer-by-layer comparison of the lowered x86 model with the reference graph."""
from __future__ import annotations

import torch
from torch import fx

from qcompile.ir import module_path


class _Tap(fx.Interpreter):
    def __init__(self, gm, names):
        super().__init__(gm)
        self.names, self.values = set(names), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


def _int(v: torch.Tensor) -> torch.Tensor:
    return v.int_repr().int() if v.is_quantized else v.int()


def layer_agreement(ref: fx.GraphModule, lowered, args, kwargs) -> list[dict]:
    """For every quantized value both graphs compute: fraction of elements equal and within one step."""
    taps = lowered.taps
    with torch.no_grad():
        r = _Tap(ref, taps.keys())
        r.run(*torch.utils._pytree.tree_flatten((args, kwargs))[0])
        l = _Tap(lowered.gm, taps.values())
        l.run(*torch.utils._pytree.tree_flatten((args, kwargs))[0])
    nodes = {n.name: n for n in ref.graph.nodes}
    rows = []
    for qname, lname in taps.items():
        if qname not in r.values or lname not in l.values:
            continue
        a, b = _int(r.values[qname]), _int(l.values[lname])
        if a.shape != b.shape:
            b = b.reshape(a.shape)
        d = (a - b).abs()
        src = nodes[qname].args[0]
        rows.append({"value": src.name, "module": module_path(src), "equal": (d == 0).float().mean().item(),
                     "within_one_step": (d <= 1).float().mean().item(), "max_steps": int(d.max().item())})
    return rows


def first_divergence(rows: list[dict], threshold: float = 0.99) -> dict | None:
    for row in rows:
        if row["within_one_step"] < threshold:
            return row
    return None
