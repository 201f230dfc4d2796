"""Plain-text tables for the report and the evaluation (nothing is cut: the last column runs to its end)."""
from __future__ import annotations

import json
import math
import os
import tempfile


def fmt(v) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def table(cols: list[str], rows: list[list]) -> str:
    """Columns padded to their widest cell; the last column is printed in full, never truncated."""
    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals[:-1], widths)) + "  " + vals[-1]
    return "\n".join([line(cols).rstrip(), line(["-" * w for w in widths]).rstrip()] +
                     [line(r).rstrip() for r in cells])


def human_bytes(n) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def evaluation_text(ev) -> str:
    out = [f"qcompile evaluation — {ev.task}, {ev.n_samples} samples",
           f"candidate: {ev.runtime.get('candidate', '')} · reference: {ev.runtime.get('reference', '')}",
           f"{ev.metric}: reference {ev.reference_metric:.4f}, candidate {ev.candidate_metric:.4f} "
           f"(change {ev.change:+.4f}); agreement with reference {ev.agreement:.4f}",
           f"model bytes: candidate {human_bytes(ev.model_bytes.get('candidate'))}, "
           f"reference {human_bytes(ev.model_bytes.get('reference'))}"]
    if ev.slices:
        out += ["", "slices (worst first):",
                table(["slice", "n", "reference", "candidate", "change"],
                      [[s["slice"], s["n"], s["reference"], s["candidate"], f"{s['change']:+.4f}"] for s in ev.slices])]
    out += ["", f"changed predictions: {ev.n_changed}"]
    if ev.changed:
        keys = [k for k in ev.changed[0] if k not in ("tokens_changed",)]
        out.append(table(keys, [[r.get(k, "") for k in keys] for r in ev.changed[:20]]))
        if len(ev.changed) > 20:
            out.append(f"... {ev.n_changed - 20} more (ev.changed, ev.to_json())")
    if ev.latency.get("candidate"):
        rows = []
        for who in ("candidate", "reference"):
            for b, st in ev.latency[who].items():
                if "error" in st:
                    rows.append([who, b, "", "", "", "", "", st["error"]])
                else:
                    sp = ev.speedup.get(b, {}).get("median", "") if who == "candidate" else ""
                    rows.append([who, b, st["p50_ms"], st["p90_ms"], st["p99_ms"], st["max_ms"],
                                 st["throughput_per_s"], f"{sp}x" if sp != "" else ""])
        out += ["", "latency (ms; interleaved runs):",
                table(["model", "batch", "p50", "p90", "p99", "max", "samples/s", "speed-up"], rows)]
    if ev.memory:
        out.append(f"peak memory growth at batch {ev.memory.get('batch')}: candidate "
                   f"{human_bytes(ev.memory.get('candidate_peak_bytes'))}, reference "
                   f"{human_bytes(ev.memory.get('reference_peak_bytes'))}")
    return "\n".join(out)


def to_json(data: dict, path: str | None = None) -> str:
    """``data`` as indented JSON (values JSON lacks written as their ``str``); written to ``path`` if given,
    atomically (a temporary file renamed over it: a failed write leaves no half-written file)."""
    text = json.dumps(data, indent=2, default=str)
    if path:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return text
