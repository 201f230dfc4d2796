"""docs/conformance.md from the conformance results (one dict per model x backend x mode job)."""
from __future__ import annotations

import math
import platform
import re
import subprocess
from collections import Counter, defaultdict

SQNR_FLOOR = 15.0


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
        flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
    except OSError:
        name, flags = platform.processor(), []
    feats = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
    try:
        import torch
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        cap = "?"
    return f"{name or 'unknown CPU'} ({', '.join(feats) or 'no AVX2'}; torch capability {cap})"


def passed(r) -> bool:
    """Compiles, runs in memory and its saved file loads and runs on the runtime."""
    return bool(r.get("compiles") and r.get("runs") and r.get("loads"))


def _db(v) -> str:
    if v is None:
        return "—"
    return "inf" if v == math.inf else f"{v:.1f}"


def _pct(v) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.0f}%" if round(100 * v, 1) in (0.0, 100.0) or abs(100 * v - round(100 * v)) < 0.05 else f"{100 * v:.1f}%"


def _short(text: str, n: int = 110) -> str:
    text = re.sub(r"\s+", " ", text or "").replace("|", "\\|")
    return text if len(text) <= n else text[:n - 1] + "…"


_GEMM_NAMES = ("conv", "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "scaled_dot_product_attention")


def _is_gemm(op: str, macs: int) -> bool:
    """A report row of a GEMM: it has MACs, or its op name says so (a row whose op kind qcompile does not
    recognize, e.g. ``conv2d.padding``, carries 0 MACs in the report)."""
    return bool(macs) or op.startswith("conv") or op in _GEMM_NAMES


def fallback_summary(r) -> str:
    """GEMM fallbacks grouped by (op, reason) first (bold), then the other float ops by op."""
    fb = r.get("fallbacks") or []
    gemm = Counter((op, reason) for op, reason, macs, *_ in fb if _is_gemm(op, macs))
    other = Counter(op for op, reason, macs, *_ in fb if not _is_gemm(op, macs))
    parts = [f"**{op}×{n}**: {_short(reason, 70)}" for (op, reason), n in gemm.most_common(3)]
    if other:
        parts.append("float: " + ", ".join(f"{op}×{n}" for op, n in other.most_common(5)) +
                     (" …" if len(other) > 5 else ""))
    return "; ".join(parts) or "none"


def status_cells(r) -> tuple[str, str]:
    if not r.get("compiles"):
        return f"✗ {_short(r.get('error', ''))}", "—"
    if not r.get("runs"):
        return "✓", f"✗ run: {_short(r.get('error', ''))}"
    if not r.get("loads"):
        return "✓", f"✗ load: {_short(r.get('load_error', ''))}"
    return "✓", "✓"


def row_cells(r) -> list[str]:
    comp, runs = status_cells(r)
    peer_sqnr = _db(r.get("peer_sqnr")) if "peer_error" not in r else f"✗ ({_short(r['peer_error'], 50)})"
    lat = f"{r['latency_ratio']:.2f}×" if r.get("latency_ratio") else "—"
    return [r["model"], r["backend"], r["mode"], comp, runs, f"{_db(r.get('sqnr'))} / {peer_sqnr}",
            f"{_pct(r.get('mac_share'))} / {_pct(r.get('peer_mac_share'))}",
            fallback_summary(r) if r.get("compiles") else "—", lat]


HEADER = ["model", "backend", "mode", "compiles", "loads & runs", "SQNR dB qcompile / peer",
          "int8 MACs qcompile / peer", "float fallbacks (reasons)", "latency vs float"]


def summary(rows: list) -> list[str]:
    n = len(rows)
    ok = [r for r in rows if passed(r)]
    sane = [r for r in ok if (r.get("sqnr") or -math.inf) >= SQNR_FLOOR]
    with_peer = [r for r in rows if r.get("peer_sqnr") is not None or passed(r)]
    wins = [r for r in with_peer if passed(r) and (r.get("peer_sqnr") is None
                                                    or (r.get("sqnr") or -math.inf) >= r["peer_sqnr"])]
    mac_pairs = [r for r in rows if r.get("peer_mac_share") is not None or r.get("mac_share") is not None]
    mac_ok = [r for r in mac_pairs if passed(r) and (r.get("mac_share") or 0) + 1e-3 >= (r.get("peer_mac_share") or 0)]
    models = len({r["model"] for r in rows})
    lines = [f"- {n} model × backend × mode rows over {models} models",
             f"- **pass rate** (compiles, runs, saved file loads and runs on the runtime): {len(ok)}/{n} "
             f"({_pct(len(ok) / n if n else 0)})"]
    for b in sorted({r["backend"] for r in rows}):
        sub = [r for r in rows if r["backend"] == b]
        lines.append(f"  - {b}: {sum(passed(r) for r in sub)}/{len(sub)}")
    lines += [f"- **SQNR ≥ {SQNR_FLOOR:.0f} dB**: {len(sane)}/{n} rows ({len(sane)}/{len(ok)} of those that run)",
              f"- **qcompile SQNR ≥ peer SQNR**: {len(wins)}/{len(with_peer)} pairs ({_pct(len(wins) / len(with_peer) if with_peer else 0)}; "
              f"a qcompile failure counts as a loss, a peer failure as a win; target ≥ 90%)",
              f"- **int8 MAC share ≥ peer's**: {len(mac_ok)}/{len(mac_pairs)} pairs",
              f"- peer failures: {sum('peer_error' in r for r in rows)}/{n}"]
    return lines


def failure_groups(rows: list) -> list[str]:
    """Failing rows grouped by backend and cause (error text with node names and numbers masked)."""
    groups = defaultdict(list)
    for r in rows:
        if passed(r):
            continue
        if not r.get("compiles"):
            text, where = r.get("error", ""), r.get("where", "")
        elif not r.get("runs"):
            text, where = "run: " + r.get("error", ""), r.get("where", "")
        else:
            text, where = "load: " + r.get("load_error", ""), r.get("load_where", "")
        cause = re.sub(r"'[^']*'|\"[^\"]*\"|\d+(\.\d+)?", "…", text)[:160]
        groups[(r["backend"], cause)].append((f"{r['model']}/{r['mode']}", _short(text, 300), where))
    out = []
    for (backend, _), items in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
        names = ", ".join(m for m, _, _ in items)
        out.append(f"- **{backend}** ({len(items)}): {items[0][1]}  \n  at `{items[0][2]}` — {names}")
    return out


def shortfalls(rows: list) -> list[str]:
    out = []
    for r in rows:
        if not passed(r):
            continue
        notes = []
        if (r.get("sqnr") or -math.inf) < SQNR_FLOOR:
            notes.append(f"SQNR {_db(r.get('sqnr'))} dB < {SQNR_FLOOR:.0f}")
        if r.get("peer_sqnr") is not None and r["sqnr"] < r["peer_sqnr"]:
            notes.append(f"SQNR {_db(r['sqnr'])} < peer {_db(r['peer_sqnr'])} dB")
        if r.get("peer_mac_share") is not None and (r.get("mac_share") or 0) + 1e-3 < r["peer_mac_share"]:
            notes.append(f"int8 MACs {_pct(r.get('mac_share'))} < peer {_pct(r['peer_mac_share'])}")
        if notes:
            out.append(f"- {r['model']} / {r['backend']} / {r['mode']}: {'; '.join(notes)}")
    return out


def render(rows: list, cmdline: str = "") -> str:
    import torch
    peers = sorted({(r["backend"], r.get("peer_method", "")) for r in rows if r.get("peer_method")})
    head = [
        "# Conformance: Hugging Face architectures on every backend", "",
        f"CPU: {cpu_name()}; torch {torch.__version__}, 1 thread. Generated by "
        f"`python bench/conformance.py {cmdline}`.", "",
        "Models are `transformers` architectures built from their config classes with small sizes and random, "
        "seeded weights (bench/conformance_models.py). Static mode calibrates on 4 samples; SQNR is against the "
        "float model, pooled over 4 held-out inputs (their total signal over their total noise; on one input of "
        "these random-weight models it swings by up to 7 dB, on both sides). int8 MACs: MACs of the GEMMs (conv / linear / matmul / attention) run "
        "in int8, over the float model's total GEMM MACs, one formula for both sides (bench/conformance_macs.py); "
        "only GEMMs whose result reaches the output count, on either side (a BERT pooler behind a "
        "last-hidden-state wrapper is work no tool needs to do). "
        "Latency: median of 10 interleaved calls of the artifact / the float PyTorch model (eager, batch as in "
        "the example; 1 thread); these models are tiny, so the ratio mostly measures per-operator overhead "
        "(Python / portable kernels), and the machine is shared: indicative only. **loads & runs**: the "
        "artifact runs, and its file (.qc / .onnx / .pte) loaded by the runtime alone (qcompile.load, an ONNX "
        "Runtime session, executorch.runtime) gives the artifact's output (≥ 30 dB). A failure is shown as "
        "the exception type and the first line of its message; the JSON results also hold the innermost "
        "qcompile frame (`where`).", "",
        "Run: `python bench/conformance.py [--models a,b] [--backends x86,onnx,executorch] [--timeout S] "
        "[--out FILE] [--results FILE.jsonl]`; `pytest -m slow tests/test_conformance.py` asserts issue 11's "
        "criteria over the whole suite, the default test run a fast subset.", "",
        "Peers: " + "; ".join(f"{b}: {m}" for b, m in peers), "", "## Summary", ""]
    body = summary(rows) + ["", "## Results", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    body += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    body += ["", "## Failures by cause", ""] + (failure_groups(rows) or ["none"])
    body += ["", "## SQNR and int8-coverage shortfalls (rows that run)", ""] + (shortfalls(rows) or ["none"])
    return "\n".join(head + body) + "\n"
