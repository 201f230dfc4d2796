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


# -- what machine, and its limits --------------------------------------------------------------------
def cpu_flags() -> set:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def isa() -> str:
    """The int8-relevant ISA level: AMX > AVX-512 VNNI > AVX-512 > AVX2 > baseline."""
    f = cpu_flags()
    if "amx_int8" in f:
        return "AMX-INT8 + AVX-512 VNNI"
    if "avx512_vnni" in f:
        return "AVX-512 VNNI"
    if "avx512f" in f:
        return "AVX-512 (no VNNI)"
    if "avx2" in f:
        return "AVX2" + (" + AVX-VNNI" if "avx_vnni" in f else " (no VNNI)")
    return "baseline SSE"


def machine_line() -> str:
    import torch
    return (f"CPU: {cpu_model()} | ISA: {isa()} | torch kernels: {torch.backends.cpu.get_cpu_capability()} | "
            f"threads: {torch.get_num_threads()}")


def _cpu_field(name: str) -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def int8_macs_per_cycle() -> tuple[int, str]:
    """Nominal int8 multiply-accumulates per cycle per core for this CPU's best int8 instruction, and how
    that figure was reached (a nominal peak: no kernel reaches it; it says how far a figure is from it)."""
    f, vendor = cpu_flags(), _cpu_field("vendor_id")
    if "amx_int8" in f:
        return 1024, "AMX TMUL: 16x16x64 int8 tile product per 16 cycles"
    if "avx512_vnni" in f:
        if vendor == "AuthenticAMD" and _cpu_field("cpu family") == "25":  # Zen 4: 512-bit ops on 256-bit pipes
            return 64, "AVX-512 VNNI on Zen 4: vpdpbusd, 2 x 256-bit pipes = 64 MACs/cycle"
        return 128, "AVX-512 VNNI: vpdpbusd (64 MACs) on 2 ports"
    if "avx_vnni" in f:
        return 64, "AVX-VNNI: 256-bit vpdpbusd (32 MACs) on 2 ports"
    if "avx2" in f:
        return 32, "AVX2: vpmaddubsw + vpmaddwd + vpaddd for 32 MACs on 2 ports, ~1 per cycle net"
    return 8, "SSE4: pmaddubsw"


def int8_peak_macs_per_s(threads: int) -> tuple[float, str]:
    """cores used x clock x int8 MACs per cycle. The clock is measured (qcompile.kernels.measured_clock_hz:
    a dependent-add chain, boost included); /proc/cpuinfo's nominal MHz only when the probe is unavailable
    (it understates a boosting CPU: the peak then reads > 100 %)."""
    from qcompile.kernels import measured_clock_hz
    hz, src = measured_clock_hz(), "measured"
    if hz is None:
        hz, src = (float(_cpu_field("cpu MHz") or 0) or 2000.0) * 1e6, "nominal, /proc/cpuinfo"
    per_cycle, how = int8_macs_per_cycle()
    return threads * hz * per_cycle, f"{threads} cores x {hz / 1e9:.2f} GHz ({src}) x {per_cycle} ({how})"
