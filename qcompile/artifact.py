"""The compiled artifact: runs the lowered model, carries the report, saves without pickle
(``qcompile/loading.py`` reads the file back)."""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings

import torch
from torch import fx

from .errors import ConfigError, InputError, NumericsError, QCompileError, QuantizationWarning
from .qparams import sqnr
from .ir import output_steps
from .report import Report

_META = "meta.json"  # the file format itself: qcompile/serialize.py


class Artifact:
    """``art(x)`` runs the lowered model; ``art.report``; ``art.reference`` is the q/dq reference graph."""

    def __init__(self, backend, reference: fx.GraphModule, lowered, report: Report, inputs, meta: dict):
        self.backend, self.reference, self.lowered, self.report = backend, reference, lowered, report
        self.example_inputs, self._meta = inputs, meta

    @property
    def mode(self) -> str:
        return self._meta.get("mode", "static")

    # -- running --------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if kwargs or not self._like_example(args):
            self._check_inputs(args, kwargs)
        return self.backend.run(self.lowered, args, kwargs)

    def _like_example(self, args) -> bool:
        """The common call, checked in few operations: positional tensors shaped like the example inputs
        (batch aside, or the fixed batch). A batch-1 weight-only call runs this with caches its weight stream
        has just flushed, where :meth:`_check_inputs`' general walk cost ~40 us. False: the general check decides."""
        sig = self.__dict__.get("_signature", ())
        if sig == ():
            sig = self._signature = self._example_signature()
        if sig is None or len(args) != len(sig):
            return False
        for a, (dim, dtype, tail, batch) in zip(args, sig):
            if not isinstance(a, torch.Tensor) or a.dtype is not dtype or a.dim() != dim or a.shape[1:] != tail \
                    or (batch is not None and a.shape[0] != batch):
                return False
        return True

    def _example_signature(self):
        """(dim, dtype, shape after dim 0, fixed batch or None) per positional example tensor; None when the
        example has keyword or non-tensor inputs."""
        exp = self.example_inputs
        if exp is None or exp.kwargs or not all(isinstance(e, torch.Tensor) and e.dim() > 0 for e in exp.args):
            return None
        fixed = self._fixed_batch()
        return tuple((e.dim(), e.dtype, e.shape[1:], fixed) for e in exp.args)

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
                fixed = self._fixed_batch()
                if fixed is not None and a.dim() > 0 and a.shape[0] != fixed:
                    raise InputError(f"input {i} has batch {a.shape[0]}; this model was captured with its batch fixed "
                                     f"at {fixed} (torch.export could not make it dynamic: the model branches on or "
                                     f"bakes in its batch size), so it runs only that batch: compile with an example "
                                     f"of the batch you will run, or run batches of {fixed}")
        if kwargs or exp.kwargs or not all(isinstance(e, torch.Tensor) for e in exp.args):
            from .validate import check_call_inputs
            check_call_inputs(args, kwargs, exp)  # keyword and nested (dict) inputs too

    def _fixed_batch(self) -> int | None:
        """The batch size the reference graph is specialized to, or None when dim 0 of its tensor inputs is
        symbolic (or unknown: no shape metadata)."""
        if not hasattr(self, "_fixed_batch_value"):
            dims = [n.meta["val"].shape[0] for n in self.reference.graph.nodes if n.op == "placeholder"
                    and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() > 0]
            static = bool(dims) and all(isinstance(d, int) for d in dims) and len(set(dims)) == 1
            self._fixed_batch_value = dims[0] if static else None
        return self._fixed_batch_value

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
        out.update(self.backend.verify_runtime(self, self.mode))
        return out

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path) -> str:
        """Save atomically with the user's umask permissions; the extension decides the format: ``.qc``
        (any backend; :func:`qcompile.load` reads it back) or the backend's own file (``.onnx``, ``.pte``)."""
        path = os.fspath(path)
        ext = os.path.splitext(path)[1].lower()
        own = tuple(self.backend.file_extensions)
        if ext == ".qc":
            return _atomic(path, self._save_qc)
        if ext in own:
            return _atomic(path, lambda tmp: self.backend.save(self, tmp))
        raise ConfigError(f"cannot save a {self.backend.name} artifact as {path!r}: the file extension decides the "
                          f"format, and this backend writes {', '.join(('.qc',) + own)} ('.qc' is read back by "
                          f"qcompile.load; {' / '.join(own) or 'no other format'} by its own runtime)")

    def _save_qc(self, tmp: str) -> None:
        from .passes.capture import _export
        from .safe_program import program_entries
        from .serialize import pack
        try:
            ep = _export(self.reference, self.example_inputs, dynamic_batch=True)
        except Exception as e:  # noqa: BLE001
            raise QCompileError(f"could not serialise the reference graph: {e}") from e
        entries, layout = program_entries(ep)
        meta = dict(self._meta, report=self.report.to_dict(), layout=layout)
        entries.insert(0, (_META, json.dumps(meta, default=str).encode(), {"kind": "json"}))
        _write_all(tmp, pack(entries))

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


def _write_all(path: str, data: bytes, chunk: int = 1 << 20) -> None:
    """Write ``data`` to ``path`` with os.write (short writes and a full disk raise OSError) and fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view[:chunk])
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path: str, write) -> str:
    """Write to a temporary file beside ``path``, give it the umask's permissions, rename it over ``path``.
    Any failure (an exception in ``write``, a full disk, Ctrl-C) removes the temporary file and leaves an
    existing ``path`` untouched."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".qcompile-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600: a file saved for others must be readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# "Far from float": the lowered artifact's SQNR vs the float model is more than GAP_DB below the reference
# graph's own (the lowering lost what quantization kept) while under CEILING_DB, or under FLOOR_DB at all.
FAR_FROM_FLOAT = {"gap_db": 10.0, "ceiling_db": 35.0, "floor_db": 10.0}


def far_from_float(verify: dict) -> str | None:
    """Why the verified artifact is far from the float model, or None (also None when it cannot be judged:
    no float comparison, or a float output that is exactly zero)."""
    low, ref = verify.get("sqnr_vs_float_db"), verify.get("reference_sqnr_vs_float_db")
    if low is None or ref is None or math.isnan(low) or low == math.inf or ref == -math.inf:
        return None
    lim = FAR_FROM_FLOAT
    if low < ref - lim["gap_db"] and low < lim["ceiling_db"]:
        return (f"the lowered artifact is {low:.1f} dB SQNR from the float model, but the reference graph is "
                f"{ref:.1f} dB: the {verify.get('runtime', 'runtime')} lowering loses accuracy quantization did not "
                f"(SQNR vs reference {verify.get('sqnr_vs_reference_db', float('nan')):.1f} dB)")
    if low < lim["floor_db"]:
        return (f"the quantized model is only {low:.1f} dB SQNR from the float model (reference graph {ref:.1f} dB, "
                f"floor {lim['floor_db']:.0f} dB)")
    return None


def flag_numerics(report: Report, strict: bool) -> None:
    """Warn (raise under strict) when the verified artifact is far from the float model."""
    why = far_from_float(report.verify)
    report.verify["far_from_float"] = why is not None
    if why is None:
        return
    msg = (f"{report.backend} backend: {why}. fix: compile for another backend to compare, exclude the "
           f"modules whose layer-by-layer error jumps (exclude=[...]), or report the model")
    report.warnings.append(msg)
    if strict:
        raise NumericsError(f"strict=True: {msg}")
    warnings.warn(msg, QuantizationWarning, stacklevel=_user_stacklevel())  # the caller of compile()


def _user_stacklevel() -> int:
    """The stack level of the first frame outside qcompile (the user's call of compile / convert)."""
    import sys
    roots = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in
                  (sys.modules["qcompile"], sys.modules["qcompile.passes"], sys.modules["qcompile.backends"]))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(roots):
        frame, level = frame.f_back, level + 1
    return level


def _flat(out) -> list:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]
