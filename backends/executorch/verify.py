"""Runtime verification for the ExecuTorch backend: delegation shares, sizes, non-delegated nodes.

``Artifact.verify`` compares the runtime's outputs with the reference graph; this adds what only the
lowered program knows: which share of nodes (and of conv / linear nodes) XNNPACK runs in int8, the
.pte size, the share of weights stored as int8, and every node that is not delegated, with the reason.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile import annotation as A
from qcompile.ir import get_attr_value

from .support import GEMM_KINDS, NOTES

_WEIGHT_OPS = GEMM_KINDS + ("embedding", "conv_transpose2d")


def weight_storage(gm: fx.GraphModule) -> dict:
    """Weights of conv / linear / embedding nodes of the exported graph: how many elements are int8."""
    from qcompile.passes.pattern import op_kind
    int8 = total = 0
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
        int8 += t.numel() if t.dtype in (torch.int8, torch.uint8) else 0
    return {"weight_elements": total, "int8_weight_elements": int8,
            "int8_weight_share": round(int8 / total, 4) if total else 0.0}


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
