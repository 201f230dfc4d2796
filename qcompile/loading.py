"""``qcompile.load``: read a ``.qc`` file (no code runs: ``docs/trust.md``) and rebuild the artifact through
the pipeline, with the report the compile wrote."""
from __future__ import annotations

import os

from .artifact import _META, Artifact
from .errors import ArtifactFileError, ConfigError, QCompileError
from .pipeline import finish, loaded_context
from .report import Report, Row


def load(path) -> Artifact:
    """Load a ``.qc`` file written by :meth:`Artifact.save`. Nothing in the file can run code: the format
    is qcompile's own container (JSON + raw tensor bytes, checksummed; see ``docs/trust.md``); a file that
    fails a check raises :class:`~qcompile.errors.ArtifactFileError` naming the file and the problem."""
    from .safe_program import load_program
    from .serialize import read_json, unpack
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ArtifactFileError(f"no such file: {path}")
    if os.path.isdir(path):
        raise ArtifactFileError(f"{path} is a directory; qcompile.load reads a .qc file")
    with open(path, "rb") as f:
        entries = unpack(path, f.read())
    meta = read_json(path, entries, _META)
    if not isinstance(meta, dict) or not isinstance(meta.get("layout"), dict):
        raise ArtifactFileError(f"{path}: malformed {_META} entry (no layout); the file is corrupt")
    ep = load_program(path, entries, meta["layout"])
    try:
        return _rebuild(path, meta, ep)
    except QCompileError:
        raise
    except Exception as e:  # noqa: BLE001 - a checked graph that still cannot be lowered: refuse the file
        raise ArtifactFileError(f"{path}: the artifact could not be rebuilt ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); the file is corrupt or was written "
                                f"by an incompatible qcompile / torch version") from e


def _rebuild(path: str, meta: dict, ep) -> Artifact:
    """The artifact from a checked program and its metadata: lowered again for the recorded backend."""
    from .backends import get_backend
    from .passes.capture import CapturedInputs
    name, options, rep = meta.get("backend"), meta.get("options", {}), meta.get("report")
    if not isinstance(name, str) or not isinstance(options, dict) or not isinstance(rep, dict):
        raise ArtifactFileError(f"{path}: malformed {_META} entry (backend / options / report)")
    if any(not isinstance(v, (str, int, float, bool, type(None))) for v in options.values()):
        raise ArtifactFileError(f"{path}: malformed backend options in {_META}")
    try:
        backend = get_backend(name, **options)
    except (TypeError, ConfigError) as e:
        raise ArtifactFileError(f"{path}: backend {name!r} does not take the options the file records "
                                f"({e}); the file was written by another qcompile version or with a "
                                f"third-party backend that is not installed") from None
    ref = ep.module()
    ref.graph.eliminate_dead_code()
    for node in list(ref.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            ref.graph.erase_node(node)
    ref.recompile()
    example = ep.example_inputs
    inputs = CapturedInputs(tuple(example[0]), dict(example[1])) if example else None
    try:
        rows = [Row(**r) for r in rep["nodes"]]
        ctx = loaded_context(backend, inputs, str(meta["mode"]), rep.get("config", {}), rows)
    except (TypeError, KeyError) as e:
        raise ArtifactFileError(f"{path}: malformed report in {_META} ({type(e).__name__}: {e})") from None
    art = finish(ref, ctx, verify=False)
    art.report.verify = rep.get("verify", {})
    _restore_report(art.report, rep)
    rules = meta.get("user_rules")
    if isinstance(rules, list) and rules:
        art.report.warnings.append(f"compiled with the user lowering rules {[str(r) for r in rules]} (with_rules), "
                                   f"which a file cannot carry: loaded and lowered without them")
    return art


# what the compile measured and the file keeps (plain JSON values): shown again by inspect / report FILE
_SAVED_REPORT_FIELDS = {"heldout": dict, "layer_sqnr": list, "activations": list, "health": dict,
                        "warnings": list, "algorithms": dict, "weight_rounding": dict, "timings": dict}


def _restore_report(report: Report, rep: dict) -> None:
    for name, kind in _SAVED_REPORT_FIELDS.items():
        value = rep.get(name)
        if isinstance(value, kind) and value and hasattr(report, name):
            setattr(report, name, value)
