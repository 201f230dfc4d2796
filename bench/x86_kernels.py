#!/usr/bin/env python3
"""x86 int8 kernel study for the qcompile x86 backend (latency + AVX2 saturation accuracy).

Prints markdown tables; docs/x86-kernels.md is written from its output. This file is the command line
(re-executing itself under the ISA caps) and the merging of saved runs; the measurements are in
_kernel_latency.py and _kernel_accuracy.py, the timing harness in _kernel_harness.py.

    python3 bench/x86_kernels.py                # AVX2-capped run (+ native accuracy contrast)
    python3 bench/x86_kernels.py --isa native   # whatever ISA the host has, no caps
    python3 bench/x86_kernels.py --quick        # fewer repeats (smoke test)

ISA capping.  The deployment target is AVX2+FMA without VNNI (Zen 3).  If the host has
AVX-512/VNNI/AMX, every library would pick those kernels, and in particular the u8*s8 GEMM
would use ``vpdpbusd`` (no int16 saturation).  So by default the benchmark re-executes
itself with the libraries capped to AVX2:

    ONEDNN_MAX_CPU_ISA=AVX2          oneDNN (fp32 conv, the onednn int8 engine, onednn.* ops)
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2  fbgemm (fbgemm / x86 int8 engines)
    ATEN_CPU_CAPABILITY=avx2         ATen vectorised kernels (quantize, qadd, qmaxpool, ...)
    MKL_ENABLE_INSTRUCTIONS=AVX2     MKL sgemm (fp32 linear)

What the caps can NOT emulate: the "x86" engine picks oneDNN vs fbgemm for conv from
cpuinfo's CPUID bit ``avx512_vnni`` (``should_use_onednn_quant``: vnni && groups <= 100 &&
symmetric weights).  On a VNNI host the "x86" column therefore shows the capped *oneDNN*
kernel; on a real AVX2 machine "x86" conv == fbgemm.  The tables say which one ran.
Absolute timings are of course of this host's micro-architecture, only ratios transfer.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import time
import warnings

CAP_ENV = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FLAGS = cpu_flags()
HOST_VNNI = "avx512_vnni" in FLAGS          # what cpuinfo (and so the x86 engine) sees
HOST_AVX512 = "avx512f" in FLAGS


# --------------------------------------------------------------------------- parent
def parent(args) -> int:
    sections = args.sections
    runs = []
    if args.isa == "native" or not HOST_AVX512:
        runs.append(("native", {}, sections))
    else:
        runs.append(("avx2-capped", CAP_ENV, sections))
        if not args.no_native_contrast and "acc" in sections:
            runs.append(("native", {}, "acc"))
    rc = 0
    for label, env_add, secs in runs:
        env = dict(os.environ)
        env.update(env_add)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--label", label, "--sections", secs]
        if args.quick:
            cmd.append("--quick")
        cmd += ["--max-seconds", str(args.max_seconds)]
        rc |= subprocess.call(cmd, env=env)
        sys.stdout.flush()
    return rc


# --------------------------------------------------------------------------- child
def child(args) -> None:
    """One measurement run, in a process whose environment already holds the ISA caps: the sections live in
    _kernel_latency.py / _kernel_accuracy.py, the timing harness in _kernel_harness.py (all import torch)."""
    import torch

    from _kernel_accuracy import section_acc, section_dyn
    from _kernel_harness import Harness, out
    from _kernel_latency import section_conv, section_elem, section_linear

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    random.seed(0)
    h = Harness(args)
    h.header()
    # the order of the original study: conv (1, 1b), linear (1c), elementwise (2), dynamic (4), accuracy (3)
    for name, section in (("conv", section_conv), ("linear", section_linear), ("elem", section_elem),
                          ("dyn", section_dyn), ("acc", section_acc)):
        if name in args.sections:
            section(h)
    out(f"_run `{args.label}` took {time.perf_counter() - h.t_start:.0f} s_\n")


# --------------------------------------------------------------------------- aggregation
_NUM = re.compile(r"^(-?[0-9.]+(?:e-?\d+)?)(~?)(x?)(?: \(([0-9.]+)(~?)x\))?( \[[a-z0-9]+\])?$")


def _read_tables(paths) -> tuple[dict, dict, dict]:
    """heading -> rows keyed by their non-numeric cells (one list of cells per run), headers, runs per heading."""
    tables, headers, nruns = {}, {}, {}
    for fn in paths:
        h, seen = None, {}
        for line in open(fn):
            line = line.rstrip("\n")
            if line.startswith("### "):
                seen[line] = seen.get(line, 0) + 1
                h = line if seen[line] == 1 else f"{line} ({seen[line]})"
                nruns[h] = nruns.get(h, 0) + 1
                continue
            if h is None or not line.startswith("| ") or set(line) <= set("|- "):
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if h not in headers:
                headers[h], tables[h] = cells, {}
                continue
            if cells == headers[h]:
                continue
            key = tuple(None if _NUM.match(c) else c for c in cells)
            tables[h].setdefault(key, []).append(cells)
    return tables, headers, nruns


def _median(ms, iv, ifl):
    good = [float(m.group(iv)) for m in ms if m.group(iv) is not None and not m.group(ifl)]
    bad = [float(m.group(iv)) for m in ms if m.group(iv) is not None and m.group(ifl)]
    return (statistics.median(good), "") if good else (statistics.median(bad), "~")


def _merge_cell(vals, heading: str) -> str:
    ms = [_NUM.match(v) for v in vals]
    if not all(ms) or "Saturation" in heading:
        return vals[0]
    v, f = _median(ms, 1, 2)
    s0 = ms[0].group(1)
    txt = f"{v:.2e}" if "e" in s0 else f"{v:.{len(s0.split('.')[1]) if '.' in s0 else 0}f}"
    txt += f + ms[0].group(3)
    if ms[0].group(4) is not None:
        r, fr = _median(ms, 4, 5)
        txt += f" ({r:.2f}{fr}x)"
    return txt + (ms[0].group(6) or "")


def aggregate(paths) -> None:
    """Merge several saved outputs of this script: per table cell, the median over runs of the values
    that were not flagged `~` (flag kept only if every run was flagged).  Non-numeric cells (and the
    deterministic accuracy table) are taken from the first run.  Tables are matched by heading; a
    heading that occurs twice in one file (e.g. the native accuracy contrast) gets a `(2)` suffix."""
    tables, headers, nruns = _read_tables(paths)
    for cur, rows in tables.items():
        print(cur + "\n")
        print("| " + " | ".join(headers[cur]) + " |")
        print("|" + "---|" * len(headers[cur]))
        for runs in rows.values():
            print("| " + " | ".join(_merge_cell(list(c), cur) for c in zip(*runs)) + " |")
        print(f"\n_{nruns[cur]} run(s) merged_\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", choices=["avx2", "native"], default="avx2",
                    help="avx2 (default): cap oneDNN/fbgemm/ATen/MKL to AVX2 if the host has AVX-512")
    ap.add_argument("--sections", default="conv,linear,elem,dyn,acc",
                    help="comma list of conv,linear,elem,dyn,acc")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=90.0,
                    help="soft wall-clock target for the timing sections of one run (default 90); "
                         "once behind it, sampling drops to the minimum")
    ap.add_argument("--no-native-contrast", action="store_true",
                    help="skip the uncapped accuracy run on AVX-512/VNNI hosts")
    ap.add_argument("--aggregate", nargs="+", metavar="OUTPUT.md",
                    help="merge saved outputs of several runs (median of unflagged cells) and exit")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--label", default="native", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.aggregate:
        aggregate(args.aggregate)
        return 0
    if args.child:
        child(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
