"""Read back what ExecuTorch did with each reference node: XNNPACK int8, XNNPACK fp32, or portable.

The lowered edge program holds ``executorch_call_delegate`` calls (XNNPACK subgraphs, whose original
nodes stay readable in ``lowered_module.original_module``) and the nodes left on ExecuTorch's portable
kernels. Every edge node carries the reference node it came from in ``meta["custom"][TAG]`` (set
before export; torch.export and the edge passes propagate it, decompositions included), with
``meta["from_node"]`` provenance as a fallback. A delegated node runs on int8 tensors when it sits in
the quantized pattern XNNPACK fuses: dequantize inputs -> op (-> fused relu/clamp) -> quantize, with
those q/dq nodes tagged "implicit" by the partitioner (folded into the op rather than run as converts).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from qcompile import meta
from qcompile import annotation as A

TAG = meta.EXECUTORCH_REF
IMPLICIT_QDQ = "IS_IMPLICIT_Q_DQ_TAG"  # executorch.backends.xnnpack.utils.quant_utils
UNTRACKED = "<untracked>"
_BOOKKEEPING = ("getitem", "executorch_call_delegate")
_FUSED_ACTS = ("relu", "hardtanh", "clamp")


@dataclass(frozen=True)
class EdgeNode:
    name: str
    op: str          # short op name: "convolution", "dequantize_per_tensor" ...
    delegated: bool
    int8: bool       # delegated in XNNPACK's quantized pattern
    dynamic: bool = False  # ... its dynamic form: int8 weights, input quantized per row at run time


@dataclass
class Delegation:
    nodes: dict = field(default_factory=dict)    # reference name -> [EdgeNode] (compute ops, no q/dq)
    qdq: dict = field(default_factory=dict)      # reference name -> [EdgeNode] (quantize / dequantize)
    reasons: dict = field(default_factory=dict)  # reference name -> XNNPACK partitioner rejections
    summary: dict = field(default_factory=dict)  # ExecuTorch's get_delegation_info, as plain data

    # -- per reference node -------------------------------------------------------------------------
    def placement(self, ref: str) -> str | None:
        """"xnnpack_int8" / "xnnpack_fp32" / "portable" / "mixed", None when no edge node came from ``ref``."""
        edges = self.nodes.get(ref)
        if not edges:
            return None
        if all(e.delegated for e in edges):
            return "xnnpack_int8" if all(e.int8 for e in edges) else "xnnpack_fp32"
        return "portable" if not any(e.delegated for e in edges) else "mixed"

    def ops(self, ref: str, delegated: bool | None = None) -> str:
        names = [e.op for e in self.nodes.get(ref, ()) if delegated is None or e.delegated == delegated]
        return ", ".join(dict.fromkeys(names))

    def why(self, ref: str) -> str:
        return "; ".join(self.reasons.get(ref, ()))

    def kernel(self, ref: str) -> str:
        where = self.placement(ref)
        if where == "xnnpack_int8" and all(e.dynamic for e in self.nodes[ref]):
            return f"XNNPACK int8 dynamic {self.ops(ref)} (qd8: input quantized per row at run time)"
        if where == "xnnpack_int8":
            return f"XNNPACK int8 {self.ops(ref)}"
        if where == "xnnpack_fp32":
            return f"XNNPACK fp32 {self.ops(ref)}"
        if where == "portable":
            return f"portable {self.ops(ref)} (float)"
        return f"XNNPACK fp32 {self.ops(ref, True)} + portable {self.ops(ref, False)}" if where else ""

    def fallback_reason(self, ref: str) -> str:
        """Why a node meant to run in int8 does not run in int8 on XNNPACK."""
        where, why = self.placement(ref), self.why(ref)
        tail = f" (XNNPACK partitioner: {why})" if why else ""
        if where is None:
            return "no node of the lowered program comes from it (removed by ExecuTorch's passes)"
        if where == "xnnpack_fp32":
            return f"XNNPACK runs {self.ops(ref)} in fp32 only: no int8 pattern{tail}"
        return f"not delegated to XNNPACK: {self.ops(ref, False)} runs on ExecuTorch's portable kernels{tail}"

    def kernels_and_fallbacks(self, reference: fx.GraphModule) -> tuple[dict, dict]:
        """``kernels`` (where each node runs) and ``fallbacks`` (int8 nodes that are not int8 on XNNPACK)."""
        kernels, fallbacks = {}, {}
        for node in reference.graph.nodes:
            if node.op != "call_function" or _is_qdq_target(node.target):
                continue
            where = self.placement(node.name)
            if where != "xnnpack_int8" and _meant_int8(node):
                fallbacks[node.name] = self.fallback_reason(node.name)
            elif where is not None:
                kernels[node.name] = self.kernel(node.name)
        return kernels, fallbacks


# -- reading the lowered graph ------------------------------------------------------------------------
def op_name(node: fx.Node) -> str:
    """``aten.convolution.default`` -> ``convolution`` (namespace.op.overload -> op)."""
    parts = (getattr(node.target, "__name__", None) or str(node.target)).split(".")
    return parts[1] if len(parts) >= 3 else parts[-1]


def _is_qdq_target(target) -> bool:
    name = getattr(target, "__name__", None) or str(target)
    return "quantize_per_" in name or "quantize_affine" in name or "choose_qparams" in name


def _is_dq(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and op_name(node).startswith("dequantize_")


def _is_q(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and op_name(node).startswith("quantize_")


def _implicit(node) -> bool:
    """XNNPACK's partitioner tags the q/dq nodes it folds into a quantized op's int8 inputs / output."""
    return isinstance(node, fx.Node) and bool(node.meta.get(IMPLICIT_QDQ))


def _feeds_quant(node: fx.Node) -> bool:
    """node -> folded quantize, or node -> fused relu/clamp -> folded quantize."""
    users = list(node.users)
    if len(users) == 1 and op_name(users[0]) in _FUSED_ACTS and not _is_q(users[0]):
        users = list(users[0].users)
    return len(users) == 1 and _is_q(users[0]) and _implicit(users[0])


def _dynamic_form(node: fx.Node) -> bool:
    """A GEMM XNNPACK runs dynamically quantized: its first input is a folded dequantize of a quantize whose
    parameters a ``choose_qparams*`` node computes when the program runs (the output stays float)."""
    if op_name(node) not in _GEMM_OPS or not node.args or not (_is_dq(node.args[0]) and _implicit(node.args[0])):
        return False
    q = node.args[0].args[0]
    scale = q.args[1] if _is_q(q) and len(q.args) > 1 else None
    return isinstance(scale, fx.Node) and any("choose_qparams" in op_name(a) for a in scale.all_input_nodes)


def _int8_form(node: fx.Node) -> bool:
    """XNNPACK runs the node on int8 tensors: it reads folded dequantize inputs and writes through a
    folded quantize (or it is the relu / clamp fused onto such a node)."""
    producers = [a for a in node.all_input_nodes if a.op == "call_function"]
    if any(_is_dq(a) and _implicit(a) for a in producers):
        return _feeds_quant(node)
    if op_name(node) in _FUSED_ACTS and len(producers) == 1:
        head = producers[0]
        return any(_is_dq(a) and _implicit(a) for a in head.all_input_nodes) and _feeds_quant(head)
    return False


def ref_name(node: fx.Node) -> str:
    tag = meta.custom_get(node, TAG)
    if tag:
        return tag
    sources = node.meta.get("from_node") or []
    while sources:  # the deepest provenance entry is the name in the graph that was exported
        last = sources[-1]
        deeper = getattr(last, "from_node", None)
        if not deeper:
            return getattr(last, "name", UNTRACKED)
        sources = deeper
    return UNTRACKED


def _add(dlg: Delegation, node: fx.Node, delegated: bool) -> None:
    qdq = _is_qdq_target(node.target)
    dynamic = delegated and not qdq and _dynamic_form(node)
    entry = EdgeNode(node.name, op_name(node), delegated, dynamic or (delegated and not qdq and _int8_form(node)),
                     dynamic)
    (dlg.qdq if qdq else dlg.nodes).setdefault(ref_name(node), []).append(entry)


def read_delegation(gm: fx.GraphModule, reasons: dict | None = None) -> Delegation:
    """Walk the lowered edge graph (``edge.exported_program().graph_module``)."""
    from executorch.devtools.backend_debug import get_delegation_info
    dlg = Delegation(reasons=dict(reasons or {}))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.name.startswith("lowered_module_"):
            for inner in getattr(gm, node.name).original_module.graph.nodes:
                if inner.op == "call_function" and op_name(inner) not in _BOOKKEEPING:
                    _add(dlg, inner, True)
        elif node.op == "call_function" and op_name(node) not in _BOOKKEEPING:
            _add(dlg, node, False)
    info = get_delegation_info(gm)
    dlg.summary = {
        "delegated_subgraphs": info.num_delegated_subgraphs, "delegated_nodes": info.num_delegated_nodes,
        "non_delegated_nodes": info.num_non_delegated_nodes,
        "by_operator": {k: (v.delegated, v.non_delegated) for k, v in sorted(info.delegation_by_operator.items())},
    }
    return dlg


def _meant_int8(node: fx.Node) -> bool:
    """Was the node annotated int8? (Reference graphs loaded from a file carry no annotation: then a
    node whose tensor inputs all come from dequantize nodes is taken as meant to be int8.)"""
    ann = A.get_annotation(node)
    if ann is not None:
        return ann.status == A.INT8
    inputs = [a for a in node.all_input_nodes if a.op == "call_function"]
    return bool(inputs) and all(_is_qdq_target(a.target) for a in inputs)


_GEMM_OPS = ("convolution", "linear", "addmm", "mm")


def shares(dlg: Delegation) -> dict:
    """Delegated share of the compute nodes (q/dq and bookkeeping excluded) of a lowered edge graph:
    all of them, the conv / linear ones, and the conv / linear ones XNNPACK runs in int8."""
    edges = [e for group in dlg.nodes.values() for e in group]
    gemm = [e for e in edges if e.op in _GEMM_OPS]
    share = lambda xs, key: round(sum(key(e) for e in xs) / len(xs), 4) if xs else 1.0
    return {"compute": share(edges, lambda e: e.delegated), "gemm": share(gemm, lambda e: e.delegated),
            "gemm_int8": share(gemm, lambda e: e.int8), "subgraphs": dlg.summary.get("delegated_subgraphs", 0)}


def edge_shares(gm: fx.GraphModule) -> dict:
    """:func:`shares` of any lowered edge graph (``edge.exported_program().graph_module``), ours or not."""
    return shares(read_delegation(gm))
