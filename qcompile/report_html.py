"""The HTML report: one self-contained page (inline CSS, JS and hand-built SVG charts; no network)."""
from __future__ import annotations

import math

from markupsafe import Markup, escape

from . import annotation as A
from .textfmt import human_bytes

GREEN, RED, GREY = "#2e9e4f", "#d64545", "#9a9a9a"  # graph nodes: int8 / float / excluded
SQNR_GOOD, SQNR_MID, SQNR_BAD = "#1a9850", "#fdae61", "#d73027"  # per-layer SQNR bars
BLUE, CLIPPED = "#3a6fd8", "#e34a33"  # histogram bars inside / outside the calibrated range
CANDIDATE, REFERENCE = "#7b3294", "#8c8c8c"  # latency dots


def _n(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "∞" if math.isinf(v) else f"{v:.{digits}g}"
    return str(v)


def status_class(status: str) -> str:
    return "int8" if status == A.INT8 else "excluded" if status == A.FLOAT_EXCLUDED else "float"


def _colour(status: str) -> str:
    return {"int8": GREEN, "float": RED, "excluded": GREY}[status_class(status)]


# -- charts ------------------------------------------------------------------------------------------
def bar_chart(items: list[tuple[str, float]], unit: str, css: str, width: int = 720) -> Markup:
    """Horizontal bars, one per (label, value); value -> colour from green (high) to red (low) for dB."""
    if not items:
        return Markup("")
    row, left = 16, 220
    finite = [v for _, v in items if math.isfinite(v)]
    top = max(finite + [1.0])
    h = row * len(items) + 24
    parts = [f'<svg class="{css}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" '
             f'viewBox="0 0 {width} {h}">']
    for i, (label, v) in enumerate(items):
        y = 4 + i * row
        shown = top if not math.isfinite(v) else max(v, 0.0)
        w = (width - left - 70) * shown / top
        col = SQNR_GOOD if v >= 30 else SQNR_MID if v >= 20 else SQNR_BAD
        parts.append(f'<g><title>{escape(label)}: {_n(v)} {unit}</title>'
                     f'<text x="{left - 6}" y="{y + 11}" text-anchor="end">{escape(label[:34])}</text>'
                     f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{row - 3}" fill="{col}"/>'
                     f'<text x="{left + w + 4:.1f}" y="{y + 11}">{_n(v, 3)}</text></g>')
    parts.append(f'<text x="{left}" y="{h - 4}" class="axis">{unit} (green ≥ 30, orange ≥ 20, red below)</text></svg>')
    return Markup("".join(parts))


def histogram_svg(a: dict, width: int = 230, height: int = 110) -> Markup:
    """Value histogram of one quantized tensor; bars outside the chosen range red, range edges marked."""
    counts = a["counts"]
    top = max(counts) or 1
    x0, x1 = a["x0"], a["x1"]
    span = (x1 - x0) or 1.0
    bw = width / len(counts)
    xs = lambda v: (v - x0) / span * width
    parts = [f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 16}" '
             f'viewBox="0 0 {width} {height + 16}"><title>{escape(a["tensor"])}: range [{_n(a["lo"])}, '
             f'{_n(a["hi"])}], clipped {a["clipped_share"]:.3%}</title>']
    for i, c in enumerate(counts):
        if not c:
            continue
        mid = x0 + (i + 0.5) * span / len(counts)
        bh = max(1.0, height * math.sqrt(c / top))  # sqrt scale: the tails stay visible
        col = BLUE if a["lo"] <= mid <= a["hi"] else CLIPPED
        parts.append(f'<rect x="{i * bw:.1f}" y="{height - bh:.1f}" width="{max(bw - 0.5, 0.5):.1f}" '
                     f'height="{bh:.1f}" fill="{col}"/>')
    for edge in (a["lo"], a["hi"]):
        parts.append(f'<line x1="{xs(edge):.1f}" x2="{xs(edge):.1f}" y1="0" y2="{height}" stroke="#111" '
                     f'stroke-dasharray="3,2"/>')
    parts.append(f'<text x="2" y="{height + 12}">{_n(x0, 3)}</text>'
                 f'<text x="{width - 2}" y="{height + 12}" text-anchor="end">{_n(x1, 3)}</text></svg>')
    return Markup("".join(parts))


def latency_svg(latency: dict, width: int = 720) -> Markup:
    """Every timed run as a dot, per batch size and model (log time axis), with the p50 marked."""
    rows = [(who, b, st) for who in ("candidate", "reference") for b, st in latency.get(who, {}).items()
            if "samples_ms" in st]
    if not rows:
        return Markup("")
    allv = [v for _, _, st in rows for v in st["samples_ms"] if v > 0]
    lo, hi = math.log10(min(allv)), math.log10(max(allv))
    hi = hi if hi > lo else lo + 1
    left, row = 150, 26
    h = row * len(rows) + 28
    xs = lambda v: left + (math.log10(max(v, 1e-9)) - lo) / (hi - lo) * (width - left - 20)
    parts = [f'<svg class="latency" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" '
             f'viewBox="0 0 {width} {h}">']
    for i, (who, b, st) in enumerate(sorted(rows, key=lambda r: (int(r[1]), r[0]))):
        y = 12 + i * row
        col = CANDIDATE if who == "candidate" else REFERENCE
        parts.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{who} · batch {b}</text>')
        parts += [f'<circle cx="{xs(v):.1f}" cy="{y}" r="3" fill="{col}"/>'
                  for v in st["samples_ms"]]
        parts.append(f'<g><title>p50 {st["p50_ms"]} ms · p90 {st["p90_ms"]} · p99 {st["p99_ms"]} · max '
                     f'{st["max_ms"]}</title><rect x="{xs(st["p50_ms"]) - 1.5:.1f}" y="{y - 9}" width="3" '
                     f'height="18" fill="#111"/></g>')
    parts.append(f'<text x="{left}" y="{h - 4}" class="axis">{10 ** lo:.3g} ms</text><text x="{width - 20}" '
                 f'y="{h - 4}" text-anchor="end" class="axis">{10 ** hi:.3g} ms (log scale; bar = p50)</text></svg>')
    return Markup("".join(parts))


def graph_svg(rows: list) -> Markup:
    """The graph in layers (depth = longest path from an input), each node coloured by status; hover shows
    op, module, status and the reason."""
    if not rows:
        return Markup("")
    depth: dict[str, int] = {}
    for r in rows:
        depth[r.name] = 1 + max((depth[i] for i in getattr(r, "inputs", []) if i in depth), default=-1)
    levels: dict[int, list] = {}
    for r in rows:
        levels.setdefault(depth[r.name], []).append(r)
    bw, bh, gx, gy = 112, 20, 10, 16
    per = max(len(v) for v in levels.values())
    width, height = per * (bw + gx) + gx, len(levels) * (bh + gy) + gy
    pos = {r.name: (gx + j * (bw + gx), gy + d * (bh + gy)) for d, rs in levels.items() for j, r in enumerate(rs)}
    parts = [f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">']
    for r in rows:
        x, y = pos[r.name]
        for i in getattr(r, "inputs", []):
            if i in pos:
                px, py = pos[i]
                parts.append(f'<line x1="{px + bw / 2:.0f}" y1="{py + bh}" x2="{x + bw / 2:.0f}" y2="{y}" '
                             f'stroke="#bbb"/>')
    for r in rows:
        x, y = pos[r.name]
        tip = f"{r.name} · {r.op} · {r.module or '-'}\n{r.status}" + (f"\n{r.reason}" if r.reason else "") + \
              (f"\nkernel: {r.kernel}" if r.kernel else "")
        parts.append(f'<g class="node {status_class(r.status)}"><title>{escape(tip)}</title>'
                     f'<rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="4" fill="{_colour(r.status)}"/>'
                     f'<text x="{x + 5}" y="{y + 14}" fill="#fff">{escape(r.op[:16])}</text></g>')
    parts.append("</svg>")
    return Markup("".join(parts))


# -- page --------------------------------------------------------------------------------------------
def cards(report, evaluation) -> list[tuple[str, str, str]]:
    """(title, value, detail) of the summary cards."""
    out = []
    if report is not None:
        s = report.summary()
        bs = s["int8_byte_share"]
        out += [("Backend", report.backend, report.runtime), ("Mode", report.mode, "predicted" if report.predicted else ""),
                ("int8 share", f"{s['int8_mac_share']:.1%} of MACs",
                 f"{s['int8_param_share']:.1%} of parameters" + (f" · {bs:.1%} of stored bytes" if bs is not None else ""))]
        sz = report.sizes
        if sz.get("stored_bytes") and sz.get("float_model_bytes"):
            out.append(("Size", f"{sz['stored_bytes'] / 1e6:.2f} MB", f"{sz['stored_vs_float']:.0%} of the float "
                        f"model's {sz['float_model_bytes'] / 1e6:.2f} MB"))
        hs = report.heldout.get("summary", {})
        if "sqnr_vs_float_db_min" in hs:
            out.append(("Output SQNR vs float", f"{hs['sqnr_vs_float_db_min']:.1f} dB min",
                        f"median {hs['sqnr_vs_float_db_median']:.1f} dB over {len(report.heldout['batches'])} "
                        f"held-out batch(es) · within one step ≥ {hs.get('within_one_step_min', 0):.1%}"))
    if evaluation is not None:
        ev = evaluation
        out.append(("Metric change", f"{ev.change:+.4f}", f"{ev.metric}: {ev.reference_metric:.4f} → "
                    f"{ev.candidate_metric:.4f} · {ev.n_changed} changed of {ev.n_samples}"))
        if ev.speedup:
            b = max(ev.speedup, key=int)
            out.append(("Speed-up", f"{ev.speedup[b]['median']:.2f}×", f"batch {b}, median of interleaved pairs "
                        f"(IQR {ev.speedup[b]['iqr'][0]:.2f}–{ev.speedup[b]['iqr'][1]:.2f})"))
    return out


def render(report, evaluation=None, path: str | None = None) -> str:
    import jinja2
    env = jinja2.Environment(loader=jinja2.PackageLoader("qcompile", "templates"), autoescape=True)
    env.filters["n"] = _n
    env.filters["bytes"] = lambda v: human_bytes(v if isinstance(v, (int, float)) else None)
    env.globals["status_class"] = status_class
    layer = [(f"{r['value']} ({r['module']})" if r.get("module") else r["value"], r["sqnr_db"])
             for r in getattr(report, "layer_sqnr", [])] if report is not None else []
    html = env.get_template("report.html").render(
        r=report, ev=evaluation, cards=cards(report, evaluation), sqnr_chart=bar_chart(layer, "dB", "sqnr"),
        hists=[(a, histogram_svg(a)) for a in (report.activations if report is not None else [])],
        latency_chart=latency_svg(evaluation.latency) if evaluation is not None else "",
        graph=graph_svg(report.rows) if report is not None else "",
        statuses=sorted({r.status for r in report.rows}) if report is not None else [])
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(html)
    return html
