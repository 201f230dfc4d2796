"""Runtime verification for the ExecuTorch backend: delegation shares, sizes, non-delegated nodes.

``Artifact.verify`` compares the runtime's outputs with the reference graph; this adds what only the
lowered program knows: which share of nodes (and of conv / linear nodes) XNNPACK runs in int8, the
.pte size, how the weights are stored (int8, packed 4-bit, or low-bit codes in int8 bytes), and every
node that is not delegated, with the reason.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile import annotation as A
from qcompile.ir import get_attr_value

from .support import GEMM_KINDS, NOTES

_WEIGHT_OPS = GEMM_KINDS + ("embedding", "conv_transpose2d")


INT4_PACKED = "4-bit packed two per byte (XNNPACK qc4w)"


def weight_storage(gm: fx.GraphModule, containers: dict | None = None) -> dict:
    """Weights of conv / linear / embedding nodes of the exported graph, as the program stores them.

    ``int8_weight_elements``: one byte each (8-bit weights, and 4..7-bit codes XNNPACK keeps in int8,
    also counted in ``lowbit_in_int8_weight_elements``); ``int4_packed_weight_elements``: two per byte
    (``containers[node]`` says "packed two per byte": ``lower.weight_containers``, ``dynamic.group_containers``);
    the rest fp32.
    ``weight_bytes`` is what those take in the program, scales excluded."""
    from qcompile.ops import op_kind
    containers = containers or {}
    int8 = int4 = lowbit = total = nbytes = 0
    for node in gm.graph.nodes:
        if op_kind(node) not in _WEIGHT_OPS or len(node.args) < 2:
            continue
        w = node.args[0] if op_kind(node) == "embedding" else node.args[1]
        if isinstance(w, fx.Node) and w.op == "call_function" and w.args and isinstance(w.args[0], fx.Node):
            w = w.args[0]  # dequantize(int constant)
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue
        t = get_attr_value(gm, w)
        total += t.numel()
        form = containers.get(node.name)
        if t.dtype in (torch.int8, torch.uint8) and form and "packed two per byte" in form:
            int4 += t.numel()
            nbytes += (t.numel() + 1) // 2
        elif t.dtype in (torch.int8, torch.uint8):
            int8 += t.numel()
            lowbit += t.numel() if form else 0
            nbytes += t.numel()
        else:
            nbytes += t.numel() * t.element_size()
    share = lambda n: round(n / total, 4) if total else 0.0
    return {"weight_elements": total, "int8_weight_elements": int8, "int8_weight_share": share(int8),
            "int4_packed_weight_elements": int4, "int4_weight_share": share(int4),
            "lowbit_in_int8_weight_elements": lowbit, "weight_bytes": nbytes}


def delegation_shares(report, delegation) -> dict:
    rows = [r for r in report.rows if delegation.placement(r.name) is not None]
    gemm = [r for r in report.rows if r.op in GEMM_KINDS]
    where = {r.name: delegation.placement(r.name) for r in report.rows}
    delegated = [r for r in rows if where[r.name] in ("xnnpack_int8", "xnnpack_fp32")]
    gemm_int8 = [r for r in gemm if where[r.name] == "xnnpack_int8"]
    gemm_any = [r for r in gemm if where[r.name] in ("xnnpack_int8", "xnnpack_fp32")]
    return {
        "delegated_node_share": round(len(delegated) / len(rows), 4) if rows else 0.0,
        "delegated_conv_linear_share": round(len(gemm_any) / len(gemm), 4) if gemm else 1.0,
        "int8_conv_linear_share": round(len(gemm_int8) / len(gemm), 4) if gemm else 1.0,
        "xnnpack_int8_nodes": sum(v == "xnnpack_int8" for v in where.values()),
        "xnnpack_fp32_nodes": sum(v == "xnnpack_fp32" for v in where.values()),
        "portable_nodes": sum(v in ("portable", "mixed") for v in where.values()),
    }


def non_delegated(report, delegation) -> dict:
    """Every report node that does not run inside XNNPACK: ``name -> "op: reason"``."""
    out = {}
    for r in report.rows:
        if delegation.placement(r.name) not in ("portable", "mixed"):
            continue
        ops = delegation.ops(r.name, False)
        why = delegation.why(r.name) or NOTES.get(r.op) or f"no XNNPACK partitioner config takes {ops}"
        out[r.name] = f"{ops} on the portable kernels: {why}"
    return out


def verify_runtime(artifact) -> dict:
    lowered, report = artifact.lowered, artifact.report
    dlg = lowered.delegation
    sizes = {"pte_bytes": lowered.pte_bytes, **lowered.weights}
    report.sizes.update(sizes)
    out = {"delegation": dlg.summary, **delegation_shares(report, dlg), **sizes,
           "non_delegated": non_delegated(report, dlg)}
    fell_back = {r.name: r.reason for r in report.rows if r.status == A.FLOAT_RUNTIME}
    if fell_back:
        out["int8_fell_back"] = fell_back
    return out
