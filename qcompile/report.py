"""Coverage report: every node int8 / float with the reason, op counts, parameter and MAC shares."""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import fx

from . import annotation as A
from .errors import StrictFallbackError
from .ir import concrete_shape, get_attr_value, module_path
from .ops import op_kind

_SKIP = {"getitem", "sym_size", "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}
FLOAT_STATUSES = (A.FLOAT_UNSUPPORTED, A.FLOAT_RUNTIME)


@dataclass
class Row:
    name: str
    op: str
    module: str
    status: str
    reason: str = ""
    kernel: str = ""
    params: int = 0
    macs: int = 0
    source: str = ""
    inputs: list = field(default_factory=list)  # rows (node names) this node reads, for the graph drawing


@dataclass
class Report:
    backend: str
    runtime: str = ""
    mode: str = "static"
    rows: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    verify: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    predicted: bool = False
    storage: list = field(default_factory=list)  # one dict per stored tensor of the lowered model (storage_rows)
    weight_rounding: dict = field(default_factory=dict)  # layer -> GPTQ stats (qcompile.passes.weight_only)
    warnings: list = field(default_factory=list)  # loud problems found at compile time (Artifact.build)
    heldout: dict = field(default_factory=dict)  # verification over held-out batches: per batch + min/median
    layer_sqnr: list = field(default_factory=list)  # per quantized value: SQNR of the reference vs float (dB)
    activations: list = field(default_factory=list)  # per quantized value: chosen range, histogram, clipped share
    health: dict = field(default_factory=dict)  # calibration health findings (qcompile.health)
    algorithms: dict = field(default_factory=dict)  # accuracy algorithm -> what it did (qcompile.algorithms)

    # -- queries --------------------------------------------------------------------------------
    def by_status(self) -> Counter:
        return Counter(r.status for r in self.rows)

    def float_nodes(self, include_excluded: bool = False) -> dict[str, str]:
        ok = FLOAT_STATUSES + ((A.FLOAT_EXCLUDED,) if include_excluded else ())
        return {r.name: r.reason for r in self.rows if r.status in ok}

    def int8_nodes(self) -> list[str]:
        return [r.name for r in self.rows if r.status == A.INT8]

    def share(self, attr: str) -> float:
        total = sum(getattr(r, attr) for r in self.rows)
        done = sum(getattr(r, attr) for r in self.rows if r.status == A.INT8)
        return done / total if total else 0.0

    def bits_per_weight(self) -> dict[str, float]:
        """Stored bits per weight of each quantized layer, scales and zero points included."""
        return layer_bits(self.storage)

    def check_strict(self, allow_float=()) -> None:
        bad = {r.name: (r.op, r.reason) for r in self.rows if r.status in FLOAT_STATUSES and r.op not in allow_float}
        if bad:
            lines = "\n".join(f"  {n} ({op}): {why}" for n, (op, why) in bad.items())
            raise StrictFallbackError(
                f"strict=True: {len(bad)} node(s) would run in float on {self.backend}:\n{lines}\n"
                f"  fix: exclude them (exclude=[...]), allow them (allow_float={{'op', ...}}) or pick another backend")

    # -- output ---------------------------------------------------------------------------------
    def byte_share(self) -> float | None:
        """Share of the stored bytes (every parameter and buffer, scales included) held as integer codes."""
        if self.storage:
            total = sum(r["bytes"] for r in self.storage)
            q = sum(r["bytes"] for r in self.storage if r["role"] in _QUANT_ROLES and r["layer"])
            return round(q / total, 4) if total else 0.0
        return self.sizes.get("int8_share_of_bytes")

    def summary(self) -> dict:
        """int8_param_share: elements of ALL parameters and buffers the graph reads (embeddings, norms, RNN
        weights included) that belong to int8 nodes; int8_byte_share: stored bytes (None before convert)."""
        return {"backend": self.backend, "runtime": self.runtime, "mode": self.mode,
                "nodes": len(self.rows), "by_status": dict(self.by_status()),
                "int8_param_share": round(self.share("params"), 4), "int8_byte_share": self.byte_share(),
                "int8_mac_share": round(self.share("macs"), 4)}

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "config": self.config, "verify": self.verify, "sizes": self.sizes,
                "timings": self.timings, "predicted": self.predicted, "nodes": [asdict(r) for r in self.rows],
                "storage": self.storage, "weight_rounding": self.weight_rounding, "heldout": self.heldout,
                "layer_sqnr": self.layer_sqnr, "activations": self.activations, "health": self.health,
                "warnings": self.warnings, "algorithms": self.algorithms}

    def to_json(self, path: str | None = None) -> str:
        from .textfmt import to_json
        return to_json(self.to_dict(), path)

    def to_html(self, path: str | None = None, evaluation=None) -> str:
        """A self-contained HTML page (inline SVG charts, no network); ``evaluation`` adds its sections."""
        from .report_html import render
        return render(self, evaluation, path)

    def __str__(self) -> str:
        from .textfmt import fmt, table
        s = self.summary()
        bs = s["int8_byte_share"]
        head = (f"qcompile report — backend {self.backend} ({self.runtime}), mode {self.mode}"
                f"{' [predicted, before calibration]' if self.predicted else ''}\n"
                f"nodes: {s['nodes']}  " + "  ".join(f"{k}: {v}" for k, v in s["by_status"].items()) +
                f"\nint8 share: parameters {s['int8_param_share']:.1%} (all weights, embeddings and norms), "
                + (f"stored bytes {bs:.1%}, " if bs is not None else "") + f"MACs {s['int8_mac_share']:.1%}\n"
                + "".join(f"WARNING: {w}\n" for w in self.warnings))
        body = table(["name", "op", "module", "status", "kernel", "reason"],
                     [[r.name, r.op, r.module, r.status, r.kernel, r.reason] for r in self.rows])
        tail = ""
        if self.verify:
            tail += "\nverification (example inputs): " + ", ".join(
                f"{k}={fmt(v)}" for k, v in self.verify.items() if not isinstance(v, (dict, list)))
        if self.heldout.get("summary"):
            tail += "\nheld-out verification: " + ", ".join(f"{k}={fmt(v)}" for k, v in self.heldout["summary"].items())
        for f in self.health.get("findings", []):
            tail += f"\ncalibration health [{f['kind']}]: {f['message']}"
        if self.sizes:
            tail += "\nsizes: " + ", ".join(f"{k}={fmt(v)}" for k, v in self.sizes.items())
        tail += "\nconfig: " + json.dumps(self.config, default=str) if self.config else ""
        return head + body + tail

    __repr__ = __str__


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)




def _macs(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int]:
    """(weight elements, multiply-accumulates) of a conv / linear / matmul / attention node."""
    kind = op_kind(node)
    if node.target == torch.ops.aten.scaled_dot_product_attention.default:  # Q.K^T (L x S x E) + P.V (L x S x Ev) per batch x head
        q, k, v = (concrete_shape(a) if isinstance(a, fx.Node) else None for a in node.args[:3])
        if not (q and k and v):
            return 0, 0
        return 0, math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
    out = concrete_shape(node)
    if out is None or kind not in ("conv1d", "conv2d", "linear", "matmul", "bmm", "conv_transpose2d"):
        return 0, 0
    out_numel = math.prod(out)
    if kind in ("matmul", "bmm"):
        a = concrete_shape(node.args[0])
        return 0, out_numel * (a[-1] if a else 0)
    w = node.args[1]
    wshape = concrete_shape(w) if isinstance(w, fx.Node) else None
    if wshape is None and isinstance(w, fx.Node) and w.op == "get_attr":
        wshape = tuple(get_attr_value(gm, w).shape)
    if not wshape:
        return 0, 0
    return math.prod(wshape), out_numel * math.prod(wshape[1:])


def _param_elements(gm: fx.GraphModule, node: fx.Node, seen: set) -> int:
    """Elements of every parameter / buffer the node reads (weights, biases, embedding tables, norms, RNN
    weights), each tensor counted once over the graph."""
    total = 0
    for inp in node.all_input_nodes:
        if inp.op != "get_attr" or inp.target in seen:
            continue
        seen.add(inp.target)
        value = get_attr_value(gm, inp)
        if isinstance(value, torch.Tensor):
            total += value.numel()
    return total


def _source(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    return lines[-1] if lines else ""


def build_rows(gm: fx.GraphModule) -> list[Row]:
    """Rows from an annotated (pre-observer) graph."""
    rows, seen, names = [], set(), set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if name in _SKIP:
            continue
        ann = A.get_annotation(node)
        weight, macs = _macs(gm, node)
        params = _param_elements(gm, node, seen)
        if not params and weight and not (isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr"):
            params = weight  # a weight that is not a stored constant (a graph input)
        rows.append(Row(node.name, op_kind(node) or name, module_path(node),
                        ann.status if ann else A.FLOAT_UNSUPPORTED,
                        (ann.reason if ann else "not annotated") if not ann or ann.status != A.INT8 else
                        "; ".join(p for p in (ann.reason or "").split("; ") if p.startswith(A.WIDER_WEIGHTS)),
                        ann.pattern or "" if ann and ann.status == A.INT8 else "", params, macs, _source(node),
                        _row_inputs(node, names)))
        names.add(node.name)
    return rows


def _row_inputs(node: fx.Node, known: set) -> list[str]:
    """The rows a node reads, looking through skipped nodes (getitem, asserts)."""
    out, stack, seen = [], list(node.all_input_nodes), set()
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.name in known:
            out.append(n.name)
        elif n.op == "call_function":
            stack.extend(n.all_input_nodes)
    return sorted(out)


def apply_lowering(rows: list[Row], kernels: dict, fallbacks: dict, runtime: str) -> None:
    """Mark what the lowered artifact actually runs: kernel names, and int8 nodes that fell back."""
    for r in rows:
        if r.name in kernels:
            r.kernel = kernels[r.name]
        elif r.status == A.INT8 and r.name in fallbacks:
            r.status, r.reason, r.kernel = A.FLOAT_RUNTIME, f"{runtime}: {fallbacks[r.name]}", ""


# -- stored bytes ---------------------------------------------------------------------------------
_QUANT_ROLES = ("codes", "scales", "zero_points", "packed")


def _pieces(name: str, obj, role: str, weights: int):
    """(tensor name, tensor, role, weights represented) of one stored constant; packed weights unpacked; an
    object that holds several (a backend's bound kernel call) lists them with ``stored_pieces``."""
    if hasattr(obj, "stored_pieces"):
        yield from obj.stored_pieces(name)
        return
    if isinstance(obj, torch.Tensor):
        if obj.is_quantized:
            per_channel = obj.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
            yield name, obj.int_repr(), "codes", obj.numel()
            if per_channel:
                yield f"{name}.scales", obj.q_per_channel_scales(), "scales", 0
                yield f"{name}.zero_points", obj.q_per_channel_zero_points(), "zero_points", 0
            return
        yield name, obj, role or ("codes" if weights else "float" if obj.is_floating_point() else "int"), weights
        return
    unpack = getattr(obj, "unpack", None)
    try:
        w, b = unpack() if unpack is not None else torch.ops.quantized.linear_unpack(obj)
    except Exception:  # noqa: BLE001 - not a packed linear / conv: a container of them (RNN cell params)?
        inner = [o for o in _script_objects(obj) if o is not obj]
        for i, o in enumerate(inner):
            yield from _pieces(f"{name}.{i}", o, role, 0)
        return
    yield from _pieces(f"{name}.weight", w, "codes", w.numel())
    if b is not None:
        yield f"{name}.bias", b, "bias", 0


def _script_objects(obj) -> list:
    try:
        state = obj.__getstate__()
    except Exception:  # noqa: BLE001 - no serialisable state
        return []
    found, stack = [], [state]
    while stack:  # nested tuples / lists of the object's state (e.g. ((name, tensors, ..., objects), type))
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, torch.ScriptObject):
            found.append(item)
    return found


def storage_rows(gm: fx.GraphModule, tags: dict | None = None) -> list[dict]:
    """Bytes of every constant the lowered graph reads. ``tags``: attr -> (layer, role, weights
    represented) from the lowering; packed kernel weights are sized as their unpacked int8 + scales."""
    rows, seen = [], set()
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in seen:
            continue
        seen.add(node.target)
        layer, role, weights = (tags or {}).get(node.target, ("", "", 0))
        for name, t, r, n in _pieces(node.target, get_attr_value(gm, node), role, weights):
            rows.append({"tensor": name, "layer": layer or (node.target if n else ""), "role": r,
                         "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                         "bytes": t.numel() * t.element_size(), "weights": n})
    return rows


def layer_bits(rows: list[dict]) -> dict[str, float]:
    weights, bytes_ = Counter(), Counter()
    for r in rows:
        if r["role"] in _QUANT_ROLES and r["layer"]:
            weights[r["layer"]] += r["weights"]
            bytes_[r["layer"]] += r["bytes"]
    return {k: round(8 * bytes_[k] / weights[k], 4) for k in weights if weights[k]}


def storage_summary(rows: list[dict], float_bytes: int | None = None) -> dict:
    """Totals: stored bytes, quantized-weight bytes and their bits per weight (scales and zero points
    included), and the ratio to the float model's bytes."""
    total = sum(r["bytes"] for r in rows)
    qbytes = sum(r["bytes"] for r in rows if r["role"] in _QUANT_ROLES and r["layer"])
    qweights = sum(r["weights"] for r in rows if r["role"] in _QUANT_ROLES and r["layer"])
    out = {"stored_bytes": total, "quantized_weight_bytes": qbytes, "quantized_weights": qweights,
           "bits_per_quantized_weight": round(8 * qbytes / qweights, 4) if qweights else None}
    if float_bytes:
        out.update(float_model_bytes=float_bytes, stored_vs_float=round(total / float_bytes, 4))
    return out
