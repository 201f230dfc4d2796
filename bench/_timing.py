"""Shared timing helper for benches: interleaved runs, medians."""
from __future__ import annotations

import statistics
import time


def interleaved(fns: dict, warmup: int = 3, repeats: int = 15) -> dict:
    """Median seconds per call of each fn, with the candidates interleaved round by round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def table(rows: list[list], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
