"""The compiled artifact: runs the lowered model, carries the report, saves / loads without pickle."""
from __future__ import annotations

import copy
import json
import os
import tempfile
import time

import torch
from torch import fx

from .errors import InputError, QCompileError
from .qparams import sqnr
from .report import Report, Row, apply_lowering

FORMAT_VERSION = 1
_META = "qcompile.json"


class Artifact:
    """``art(x)`` runs the lowered model; ``art.report``; ``art.reference`` is the q/dq reference graph."""

    def __init__(self, backend, reference: fx.GraphModule, lowered, report: Report, inputs, meta: dict):
        self.backend, self.reference, self.lowered, self.report = backend, reference, lowered, report
        self.example_inputs, self._meta = inputs, meta

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, ref: fx.GraphModule, backend, ctx, verify: bool = True) -> "Artifact":
        t0 = time.perf_counter()
        lowered = backend.lower(ref, ctx.inputs)
        report = Report(backend.name, backend.runtime_name(), ctx.mode, copy.deepcopy(ctx.rows),
                        ctx.config.describe() if hasattr(ctx.config, "describe") else ctx.config)
        apply_lowering(report.rows, getattr(lowered, "kernels", {}), getattr(lowered, "fallbacks", {}),
                       backend.runtime_name())
        report.timings = dict(ctx.timings, lower_s=time.perf_counter() - t0)
        meta = {"backend": backend.name, "options": _options(backend), "mode": ctx.mode,
                "n_args": len(ctx.inputs.args), "kwargs": sorted(ctx.inputs.kwargs)}
        art = cls(backend, ref, lowered, report, ctx.inputs, meta)
        report.sizes = art._sizes()
        if verify:
            report.verify = art.verify(float_model=ctx.float_gm)
        if ctx.strict:
            report.check_strict(ctx.allow_float)
        return art

    # -- running --------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        self._check_inputs(args, kwargs)
        return self.backend.run(self.lowered, args, kwargs)

    def run_reference(self, *args, **kwargs):
        with torch.no_grad():
            return self.reference(*args, **kwargs)

    def _check_inputs(self, args, kwargs):
        exp = self.example_inputs
        if exp is None:
            return
        if len(args) != len(exp.args):
            raise InputError(f"the artifact was compiled for {len(exp.args)} positional input(s), got {len(args)}")
        for i, (a, e) in enumerate(zip(args, exp.args)):
            if isinstance(e, torch.Tensor):
                if not isinstance(a, torch.Tensor):
                    raise InputError(f"input {i} must be a tensor like the example input, got {type(a).__name__}")
                if a.dim() != e.dim() or a.dtype != e.dtype or tuple(a.shape[1:]) != tuple(e.shape[1:]):
                    raise InputError(f"input {i} has shape {tuple(a.shape)} / {a.dtype}; the artifact was compiled "
                                     f"for {tuple(e.shape)} / {e.dtype} (only the batch dimension may change)")

    # -- verification ---------------------------------------------------------------------------
    def verify(self, float_model=None, args=None, kwargs=None) -> dict:
        """Compare the lowered model with the reference graph (and float) on the example inputs."""
        args = self.example_inputs.args if args is None else args
        kwargs = self.example_inputs.kwargs if kwargs is None else kwargs
        ref = _flat(self.run_reference(*args, **kwargs))
        low = _flat(self(*args, **kwargs))
        steps = output_steps(self.reference)
        within, worst = [], 0.0
        for i, (r, l) in enumerate(zip(ref, low)):
            # a float output (quantize_outputs=False) is judged against the step of an 8-bit grid over its range
            step = steps[i] if i < len(steps) and steps[i] else max((r.max() - r.min()).item() / 255, 1e-12)
            err = (r.float() - l.float()).abs()
            within.append((err <= step * 1.001 + 1e-6).float().mean().item())
            worst = max(worst, (err.max() / step).item())
        out = {"runtime": self.backend.runtime_name(), "within_one_step": min(within) if within else 1.0,
               "max_error_in_steps": worst, "sqnr_vs_reference_db": min(sqnr(r, l) for r, l in zip(ref, low))}
        if float_model is not None:
            with torch.no_grad():
                flo = _flat(float_model(*args, **kwargs))
            out["sqnr_vs_float_db"] = min(sqnr(f, l) for f, l in zip(flo, low))
            out["reference_sqnr_vs_float_db"] = min(sqnr(f, r) for f, r in zip(flo, ref))
        extra = getattr(self.backend, "verify_runtime", None)
        if extra is not None:
            out.update(extra(self))
        return out

    # -- sizes ----------------------------------------------------------------------------------
    def _sizes(self) -> dict:
        float_bytes = int_bytes = 0
        for name, t in list(self.reference.named_buffers()) + list(self.reference.named_parameters()):
            if t.dtype in (torch.int8, torch.uint8):
                int_bytes += t.numel() * t.element_size()
            elif t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64):
                float_bytes += t.numel() * t.element_size()
        total = float_bytes + int_bytes
        return {"int8_weight_bytes": int_bytes, "other_bytes": float_bytes, "total_bytes": total,
                "int8_share_of_bytes": round(int_bytes / total, 4) if total else 0.0}

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """Save atomically: a failed save never leaves a half-written file."""
        custom = getattr(self.backend, "save", None)
        ext = os.path.splitext(path)[1].lower()
        if custom is not None and ext in getattr(self.backend, "file_extensions", ()):
            return _atomic(path, lambda tmp: custom(self, tmp))
        return _atomic(path, self._save_qc)

    def _save_qc(self, tmp: str) -> None:
        from .passes.capture import _export
        try:
            ep = _export(self.reference, self.example_inputs, dynamic_batch=True)
        except Exception as e:  # noqa: BLE001
            raise QCompileError(f"could not serialise the reference graph: {e}") from e
        meta = dict(self._meta, version=FORMAT_VERSION, report=self.report.to_dict())
        with open(tmp, "wb") as f:  # a file object: torch.export does not insist on a .pt2 suffix then
            torch.export.save(ep, f, extra_files={_META: json.dumps(meta, default=str)})

    def __repr__(self):
        s = self.report.summary()
        return f"<qcompile.Artifact backend={s['backend']} nodes={s['nodes']} int8 MACs={s['int8_mac_share']:.1%}>"

    # -- production monitoring (qcompile.monitor) -------------------------------------------------
    def monitor(self, every: int = 1):
        """A callable that runs this artifact and counts, per quantized tensor, how often inputs fall
        outside the calibrated range; :meth:`drift_report` shows the counts."""
        from .monitor import DriftMonitor
        self._drift_monitor = DriftMonitor(self, every)
        return self._drift_monitor

    def drift_report(self):
        from .monitor import DriftMonitor
        mon = getattr(self, "_drift_monitor", None) or DriftMonitor(self)
        return mon.report()


def load(path: str) -> Artifact:
    """Load a ``.qc`` file written by :meth:`Artifact.save` (no pickle: torch.export's format)."""
    from .backends import get_backend
    from .passes.capture import CapturedInputs
    from types import SimpleNamespace
    extra = {_META: ""}
    if not os.path.exists(path):
        raise QCompileError(f"no such file: {path}")
    with open(path, "rb") as f:
        ep = torch.export.load(f, extra_files=extra)
    meta = json.loads(extra[_META])
    if meta.get("version") != FORMAT_VERSION:
        raise QCompileError(f"{path}: unsupported qcompile file version {meta.get('version')}")
    backend = get_backend(meta["backend"], **meta.get("options", {}))
    ref = ep.module()
    ref.graph.eliminate_dead_code()
    for node in list(ref.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            ref.graph.erase_node(node)
    ref.recompile()
    example = ep.example_inputs
    inputs = CapturedInputs(tuple(example[0]), dict(example[1])) if example else None
    rep = meta["report"]
    ctx = SimpleNamespace(inputs=inputs, mode=meta["mode"], config=rep.get("config", {}), timings={},
                          rows=[Row(**r) for r in rep["nodes"]], strict=False, allow_float=frozenset(), float_gm=None)
    art = Artifact.build(ref, backend, ctx, verify=False)
    art.report.verify = rep.get("verify", {})
    return art


def _atomic(path: str, write) -> str:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".qcompile-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _options(backend) -> dict:
    opts = getattr(backend, "options", None)
    return dict(opts.__dict__) if opts is not None and hasattr(opts, "__dict__") else {}


def _flat(out) -> list:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def output_steps(ref: fx.GraphModule) -> list:
    """The quantization step of each graph output that comes straight from a dequantize node."""
    out = next(n for n in ref.graph.nodes if n.op == "output")
    leaves, _ = torch.utils._pytree.tree_flatten(out.args[0])
    qd = torch.ops.quantized_decomposed
    steps = []
    for leaf in leaves:
        if isinstance(leaf, fx.Node) and leaf.target == qd.dequantize_per_tensor.default:
            steps.append(float(leaf.args[1]))
        else:
            steps.append(None)
    return steps
