"""Layer-by-layer comparison of the lowered x86 model with the reference graph."""
from __future__ import annotations

import torch
from torch import fx

from qcompile.ir import module_path, record_values


def _int(v: torch.Tensor) -> torch.Tensor:
    return v.int_repr().int() if v.is_quantized else v.int()


def layer_agreement(ref: fx.GraphModule, lowered, args, kwargs) -> list[dict]:
    """For every quantized value both graphs compute: fraction of elements equal and within one step."""
    taps = lowered.taps
    flat = torch.utils._pytree.tree_flatten((args, kwargs))[0]
    ref_values, low_values = record_values(ref, flat, taps.keys()), record_values(lowered.gm, flat, taps.values())
    nodes = {n.name: n for n in ref.graph.nodes}
    rows = []
    for qname, lname in taps.items():
        if qname not in ref_values or lname not in low_values:
            continue
        a, b = _int(ref_values[qname]), _int(low_values[lname])
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
