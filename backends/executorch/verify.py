"""Runtime verification for the ExecuTorch backend: delegation shares, sizes, and float-output parity.

``Artifact.verify`` compares the runtime's outputs with the reference graph; this adds what only the
lowered program knows: which share of nodes (and of conv / linear nodes) XNNPACK runs in int8, the
.pte size, the share of weights stored as int8, and every node that is not delegated, with the reason.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree

from qcompile import annotation as A
from qcompile.ir import get_attr_value

from .support import GEMM_KINDS

_WEIGHT_OPS = GEMM_KINDS + ("embedding", "conv_transpose2d")


def weight_storage(reference: fx.GraphModule) -> dict:
    """Weights of conv / linear / embedding nodes: how many elements are stored as int8."""
    from qcompile.passes.pattern import op_kind
    int8 = total = 0
    for node in reference.graph.nodes:
        if op_kind(node) not in _WEIGHT_OPS or len(node.args) < 2:
            continue
        w = node.args[0] if op_kind(node) == "embedding" else node.args[1]
        if isinstance(w, fx.Node) and w.op == "call_function" and w.args and isinstance(w.args[0], fx.Node):
            w = w.args[0]  # dequantize(int constant)
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue
        t = get_attr_value(reference, w)
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
    return {
        "delegated_node_share": round(len(delegated) / len(rows), 4) if rows else 0.0,
        "delegated_conv_linear_share": round(len(gemm_int8) / len(gemm), 4) if gemm else 1.0,
        "xnnpack_int8_nodes": sum(v == "xnnpack_int8" for v in where.values()),
        "xnnpack_fp32_nodes": sum(v == "xnnpack_fp32" for v in where.values()),
        "portable_nodes": sum(v in ("portable", "mixed") for v in where.values()),
    }


def non_delegated(report, delegation) -> dict:
    """Every report node that does not run inside XNNPACK: ``name -> "op: reason"``."""
    out = {}
    for r in report.rows:
        where = delegation.placement(r.name)
        if where in ("portable", "mixed"):
            why = delegation.why(r.name) or r.reason or "no XNNPACK partitioner config claims it"
            out[r.name] = f"{delegation.ops(r.name, False)} on the portable kernels: {why}"
    return out


def output_parity(artifact, args=None, kwargs=None) -> dict:
    """Agreement with the reference measured in each output's quantization step. For an output that
    is not a dequantize (a float op ends the model, e.g. layer_norm), the step is that of int8
    quantizing the reference output's range: (max - min) / 255."""
    from qcompile.artifact import output_steps
    args = artifact.example_inputs.args if args is None else args
    kwargs = artifact.example_inputs.kwargs if kwargs is None else kwargs
    ref = [t for t in pytree.tree_leaves(artifact.run_reference(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    low = [t for t in pytree.tree_leaves(artifact(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    steps = output_steps(artifact.reference)
    within, worst = [], 0.0
    for i, (r, l) in enumerate(zip(ref, low)):
        r, l = r.float(), l.float()
        step = steps[i] if i < len(steps) and steps[i] else max((r.max() - r.min()).item() / 255.0, 1e-12)
        err = (r - l).abs()
        within.append((err <= step * 1.001 + 1e-6).float().mean().item())
        worst = max(worst, (err.max() / step).item())
    return {"within_one_output_step": min(within) if within else 1.0, "max_error_in_output_steps": worst}


def verify_runtime(artifact) -> dict:
    lowered, report = artifact.lowered, artifact.report
    dlg = lowered.delegation
    sizes = {"pte_bytes": lowered.pte_bytes, **weight_storage(artifact.reference)}
    report.sizes.update(sizes)
    out = {"delegation": dlg.summary, **delegation_shares(report, dlg), **sizes,
           "non_delegated": non_delegated(report, dlg), **output_parity(artifact)}
    fell_back = {r.name: r.reason for r in report.rows if r.status == A.FLOAT_RUNTIME}
    if fell_back:
        out["int8_fell_back"] = fell_back
    return out
