#!/usr/bin/env python3
"""x86 int8 kernel study for the qcompile x86 backend (latency + AVX2 saturation accuracy).

Prints markdown tables; docs/x86-kernels.md is written from its output.

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
import math
import os
import random
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
def child(args) -> None:  # noqa: C901  (one long measurement script)
    import torch
    import torch.nn.functional as F

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    random.seed(0)
    QUICK = args.quick
    t_start = time.perf_counter()
    # planned sampling budget per section (seconds) -> schedule used by bench() to respect --max-seconds
    PLAN = {"conv": 9 * 1.2 + 10 * 0.5, "linear": 2 * 1.0, "elem": 19 * 0.35, "dyn": 2 * 1.0}
    SCHEDULE = {"spent": 0.0, "plan": sum(v for k, v in PLAN.items() if k in args.sections) * (0.25 if args.quick else 1) or 1.0}
    CL = torch.channels_last

    def out(s=""):
        print(s, flush=True)

    caps = {k: os.environ.get(k) for k in CAP_ENV}
    out(f"## Run: `{args.label}`\n")
    out(f"- torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"ATen CPU capability={torch.backends.cpu.get_cpu_capability()}, "
        f"quantized engines={torch.backends.quantized.supported_engines}")
    out(f"- host flags: avx2={'avx2' in FLAGS} avx512f={HOST_AVX512} avx512_vnni={HOST_VNNI} "
        f"amx_int8={'amx_int8' in FLAGS}; caps: {caps}")
    out(f"- x86 engine conv routing on this host: {'oneDNN for groups<=100 (VNNI seen by cpuinfo)' if HOST_VNNI else 'fbgemm (no VNNI)'}"
        "; on an AVX2-only CPU x86 conv == fbgemm. x86 linear == fbgemm everywhere.\n")

    def x86_conv_backend(groups: int) -> str:
        return "onednn" if (HOST_VNNI and groups <= 100) else "fbgemm"

    # ------------------------------------------------------------- timing harness
    NOISE: list = []  # (clean fraction, p75/p25 spread of clean samples) per variant, reported per table
    SCHED = sorted(__import__("glob").glob("/proc/self/task/*/schedstat"))

    def runq_wait_ns() -> int:
        """Sum over our threads of time spent runnable-but-not-running (other tenants on our CPUs)."""
        tot = 0
        for pth in SCHED:
            try:
                with open(pth) as fh:
                    tot += int(fh.read().split()[1])
            except (OSError, ValueError, IndexError):
                pass
        return tot

    HZ = os.sysconf("SC_CLK_TCK")

    def others_busy_jiffies() -> int:
        """CPU jiffies used by everything except this process (system total minus our utime+stime)."""
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
        busy = f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)
        with open("/proc/self/stat") as fh:
            st = fh.read().rsplit(")", 1)[1].split()
        return busy - int(st[11]) - int(st[12])

    GATE = {"waited": 0.0}

    def wait_for_quiet(deadline: float, window: float = 0.02, max_jiffies: int = 1) -> None:
        """Sleep until a `window` passes in which other tenants used <= max_jiffies of CPU, or `deadline`."""
        t0 = time.perf_counter()
        while time.perf_counter() < deadline:
            b0 = others_busy_jiffies()
            time.sleep(window)
            if others_busy_jiffies() - b0 <= max_jiffies:
                break
        GATE["waited"] += time.perf_counter() - t0

    class Timings(dict):
        """name -> list of per-round samples (seconds/call, or None if contaminated by run-queue wait).

        t[name]      median of the clean samples; if fewer than 5 are clean, the 10th percentile of all
                     samples instead, and the value is flagged (printed with a trailing `~`).
        t.r(a, b)    median of per-round paired ratios a/b over rounds where both samples are clean
                     (>= 5 such rounds), else the ratio of the two estimates above (flagged if either is)."""

        def _raw(self, n):
            return dict.__getitem__(self, "_raw_" + str(n))

        def _clean(self, n):
            return [x for x in dict.__getitem__(self, n) if x is not None]

        def flagged(self, n):
            return len(self._clean(n)) < 5

        def __getitem__(self, n):
            c = self._clean(n)
            if len(c) >= 5:
                return statistics.median(c)
            return statistics.quantiles(self._raw(n), n=10)[0] if len(self._raw(n)) >= 10 else min(self._raw(n))

        def r(self, n, ref):
            a, b = dict.__getitem__(self, n), dict.__getitem__(self, ref)
            pairs = [x / y for x, y in zip(a, b) if x is not None and y is not None]
            return statistics.median(pairs) if len(pairs) >= 5 else self[n] / self[ref]

        def rf(self, n, ref, fmt="{:.2f}"):
            return fmt.format(self.r(n, ref)) + ("~" if self.flagged(n) or self.flagged(ref) else "")

        def f(self, n, conv):
            return conv(self[n]) + ("~" if self.flagged(n) else "")

    def bench(variants: dict, budget_s: float, target_sample_s: float = 1e-4,
              min_rounds: int = 15, want_clean: int = 15, max_rounds: int = 400) -> Timings:
        """Interleaved, shuffled rounds of short samples (one call each for ops >= 0.1 ms).

        The machine is shared: with 2 OpenMP threads on 2 vCPUs, a neighbour process stalls a parallel
        region for a whole scheduler slice (ms), so a 0.2 ms op can read 7 ms.  Each sample therefore
        also records the run-queue wait of our threads (/proc/self/task/*/schedstat); samples that
        waited > 20 us + 3 % are dropped, and medians are taken over the clean ones.  Sampling goes on
        until every variant has `want_clean` clean samples (or 3x the budget has elapsed)."""
        if QUICK:
            budget_s, min_rounds, want_clean = budget_s / 4, 5, 5
        # stay inside --max-seconds: once behind schedule, no quiet-window waits and no 3x extension
        SCHEDULE["spent"] += budget_s
        behind = (time.perf_counter() - t_start) > SCHEDULE["spent"] / SCHEDULE["plan"] * args.max_seconds
        slack = 1.0 if behind else 3.0
        if behind:
            min_rounds = min(min_rounds, 7)
        names = list(variants)
        inner, est = {}, {}
        for n in names:
            fn = variants[n]
            fn(); fn()
            ts = []
            for _ in range(3):
                t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
            inner[n] = max(1, int(math.ceil(target_sample_s / max(min(ts), 1e-7))))
            est[n] = inner[n] * min(ts)
        SCHED[:] = sorted(__import__("glob").glob("/proc/self/task/*/schedstat"))
        samples = Timings({n: [] for n in names})
        for n in names:
            samples["_raw_" + str(n)] = []
        t_begin, rounds, last_gate = time.perf_counter(), 0, 0.0
        while True:
            if time.perf_counter() - last_gate > 0.2:   # measure in quiet windows when there are any
                if not behind:
                    wait_for_quiet(time.perf_counter() + 0.25 * budget_s)
                last_gate = time.perf_counter()
            order = names[:]
            random.shuffle(order)
            for n in order:
                fn, k = variants[n], inner[n]
                if est[n] >= 1e-3 and not behind:  # long samples: also wait for a quiet window right before each
                    wait_for_quiet(time.perf_counter() + 0.05, window=0.01, max_jiffies=0)
                w0 = runq_wait_ns()
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                t1 = time.perf_counter()
                waited = (runq_wait_ns() - w0) * 1e-9
                dt = t1 - t0
                dict.__getitem__(samples, "_raw_" + str(n)).append(dt / k)
                dict.__getitem__(samples, n).append(dt / k if waited <= 20e-6 + 0.03 * dt else None)
            rounds += 1
            el = time.perf_counter() - t_begin
            n_clean = min(sum(x is not None for x in dict.__getitem__(samples, n)) for n in names)
            if rounds >= min_rounds and ((el >= budget_s and n_clean >= want_clean) or el >= slack * budget_s
                                         or (rounds >= max_rounds and n_clean >= 5)):
                break
        for n in names:
            v = dict.__getitem__(samples, n)
            c = [x for x in v if x is not None]
            sp = statistics.quantiles(c, n=4) if len(c) >= 4 else [1, 1, float("nan")]
            NOISE.append((len(c) / len(v), sp[2] / sp[0]))
        return samples

    def noise_note():
        if NOISE:
            cf = [c for c, _ in NOISE]
            sp = [x for _, x in NOISE if x == x]
            out(f"\n_noise: clean samples (no run-queue wait) median {statistics.median(cf) * 100:.0f}%, "
                f"worst variant {min(cf) * 100:.0f}%; p75/p25 of clean samples median "
                f"{statistics.median(sp) if sp else float('nan'):.2f}, worst {max(sp) if sp else float('nan'):.2f}; "
                f"load avg {os.getloadavg()[0]:.1f}; {GATE['waited']:.0f} s spent waiting for quiet windows so far. `~` = fewer than 5 clean samples: 10th percentile of "
                f"contaminated samples shown, unreliable_\n")
        NOISE.clear()

    def ms(t):
        return f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.2f}"

    def us(t):
        return f"{t * 1e6:.1f}"

    # ------------------------------------------------------------- quant helpers
    def q_weight(w, qmin=-128, qmax=127):
        """Per-output-channel symmetric int8 (torch.ao observer convention)."""
        amax = w.abs().flatten(1).amax(1).clamp_min(1e-8)
        s = (amax / ((qmax - qmin) / 2)).double()
        wq = torch.clamp(torch.round(w.double() / s.view(-1, *[1] * (w.dim() - 1))), qmin, qmax)
        qw = torch._make_per_channel_quantized_tensor(wq.to(torch.int8), s, torch.zeros(w.shape[0], dtype=torch.long), 0)
        return qw, wq, s

    def q_act(x, qmax=255, relu=True):
        if relu:
            s, z = float(x.max()) / qmax, 0
        else:
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            s = (hi - lo) / qmax
            z = int(round(-lo / s))
        s = max(s, 1e-8)
        return torch.quantize_per_tensor(x, s, z, torch.quint8), s, z

    def prepack(engine, qw, bias, stride, pad, groups):
        torch.backends.quantized.engine = engine
        return torch.ops.quantized.conv2d_prepack(qw, bias, [stride] * 2, [pad] * 2, [1, 1], groups)

    ENGINES = ["x86", "fbgemm", "onednn"]
    ZP = lambda n: torch.zeros(n, dtype=torch.long)  # noqa: E731

    # =========================================================== 1. conv kernels
    if "conv" in args.sections:
        resnet = [  # name, N, Cin, Cout, H, k, stride, pad, groups
            ("conv1 7x7 s2 3->64 @224", 4, 3, 64, 224, 7, 2, 3, 1),
            ("3x3 64->64 @56", 4, 64, 64, 56, 3, 1, 1, 1),
            ("3x3 s2 64->128 @56", 4, 64, 128, 56, 3, 2, 1, 1),
            ("1x1 s2 64->128 @56 (ds)", 4, 64, 128, 56, 1, 2, 0, 1),
            ("3x3 128->128 @28", 4, 128, 128, 28, 3, 1, 1, 1),
            ("1x1 s2 128->256 @28 (ds)", 4, 128, 256, 28, 1, 2, 0, 1),
            ("3x3 256->256 @14", 4, 256, 256, 14, 3, 1, 1, 1),
            ("1x1 s2 256->512 @14 (ds)", 4, 256, 512, 14, 1, 2, 0, 1),
            ("3x3 512->512 @7", 4, 512, 512, 7, 3, 1, 1, 1),
        ]
        mobilenet = [
            ("dw 3x3 32 @112", 1, 32, 32, 112, 3, 1, 1, 32),
            ("dw 3x3 s2 96 @112", 1, 96, 96, 112, 3, 2, 1, 96),
            ("dw 3x3 144 @56", 1, 144, 144, 56, 3, 1, 1, 144),
            ("dw 3x3 384 @14", 1, 384, 384, 14, 3, 1, 1, 384),
            ("dw 3x3 960 @7", 1, 960, 960, 7, 3, 1, 1, 960),
            ("pw 1x1 16->96 @112", 1, 16, 96, 112, 1, 1, 0, 1),
            ("pw 1x1 144->24 @56", 1, 144, 24, 56, 1, 1, 0, 1),
            ("pw 1x1 64->384 @14", 1, 64, 384, 14, 1, 1, 0, 1),
            ("pw 1x1 960->160 @7", 1, 960, 160, 7, 1, 1, 0, 1),
            ("pw 1x1 320->1280 @7", 1, 320, 1280, 7, 1, 1, 0, 1),
        ]
        fmt_rows = []
        for title, shapes, budget in (("ResNet-18, batch 4", resnet, 1.2), ("MobileNetV2, batch 1", mobilenet, 0.5)):
            out(f"### 1. Conv latency — {title}\n")
            out("fp32 = aten conv2d (oneDNN) with channels_last input+weight; every other cell is "
                "median time in ms and, in brackets, **speed-up vs fp32 channels_last** (>1 = faster; median of per-round paired ratios). "
                "int8 inputs are channels_last quint8 unless marked NCHW; `+relu` = `quantized.conv2d_relu`; "
                "`pw` = `onednn.qconv2d_pointwise(..., attr='relu')` on a plain uint8 tensor. "
                "'NCHW-in' columns are the time ratio of a contiguous-NCHW quint8 input vs channels_last (>1 = slower).\n")
            out("| shape | fp32 CL ms | fp32 NCHW | fbgemm | fbgemm +relu | onednn | onednn +relu | x86 (ran) | pw relu | fbgemm NCHW-in | onednn NCHW-in |")
            out("|---|---|---|---|---|---|---|---|---|---|---|")
            for name, N, Ci, Co, H, k, st, pad, g in shapes:
                xf = torch.randn(N, Ci, H, H).relu_()
                w = torch.randn(Co, Ci // g, k, k) * math.sqrt(2.0 / (Ci // g * k * k))
                b = torch.randn(Co) * 0.1
                qx_cl, xs, xz = q_act(xf.contiguous(memory_format=CL))
                qx_cl = qx_cl.contiguous(memory_format=CL)
                qx_nchw = qx_cl.contiguous()
                qw, wq, ws = q_weight(w)
                with torch.no_grad():
                    yref = F.conv2d(xf, w, b, st, pad, 1, g)
                os_, oz = float(yref.max() - yref.min()) / 255, 0
                oz = int(round(-float(yref.min()) / os_))
                packs = {e: prepack(e, qw, b, st, pad, g) for e in ENGINES}
                xcl, wcl = xf.contiguous(memory_format=CL), w.contiguous(memory_format=CL)
                u8 = qx_cl.int_repr().contiguous(memory_format=CL)
                pw = torch.ops.onednn.qconv_prepack(wq.to(torch.int8), ws.float(), xs, xz, [st] * 2, [pad] * 2, [1, 1], g, list(u8.shape))
                wsf = ws.float()

                def mk_q(e, x, relu=False):
                    op = torch.ops.quantized.conv2d_relu if relu else torch.ops.quantized.conv2d
                    p = packs[e]

                    def f():
                        torch.backends.quantized.engine = e
                        return op(x, p, os_, oz)
                    return f

                V = {
                    "fp32_cl": lambda: F.conv2d(xcl, wcl, b, st, pad, 1, g),
                    "fp32_nchw": lambda: F.conv2d(xf, w, b, st, pad, 1, g),
                    "fbgemm": mk_q("fbgemm", qx_cl), "fbgemm_relu": mk_q("fbgemm", qx_cl, True),
                    "onednn": mk_q("onednn", qx_cl), "onednn_relu": mk_q("onednn", qx_cl, True),
                    "x86": mk_q("x86", qx_cl),
                    "pw": lambda: torch.ops.onednn.qconv2d_pointwise(u8, xs, xz, pw, wsf, ZP(Co), b, [st] * 2, [pad] * 2, [1, 1], g, os_, 0, None, "relu", [], ""),
                    "fbgemm_nchw": mk_q("fbgemm", qx_nchw), "onednn_nchw": mk_q("onednn", qx_nchw),
                }
                with torch.inference_mode():
                    T = bench(V, budget)
                c = lambda n: f"{T.f(n, ms)} ({T.rf('fp32_cl', n)}x)"  # noqa: E731
                out(f"| {name} | {T.f('fp32_cl', ms)} | {c('fp32_nchw')} | {c('fbgemm')} | {c('fbgemm_relu')} | {c('onednn')} | "
                    f"{c('onednn_relu')} | {c('x86')} [{x86_conv_backend(g)}] | {c('pw')} | "
                    f"{T.rf('fbgemm_nchw', 'fbgemm')} | {T.rf('onednn_nchw', 'onednn')} |")
                if name in ("3x3 64->64 @56", "dw 3x3 144 @56", "dw 3x3 32 @112"):
                    for e in ENGINES:
                        for xin, lab in ((qx_cl, "channels_last"), (qx_nchw, "NCHW")):
                            torch.backends.quantized.engine = e
                            y = torch.ops.quantized.conv2d(xin, packs[e], os_, oz)
                            ofmt = "channels_last" if y.is_contiguous(memory_format=CL) else ("NCHW" if y.is_contiguous() else "strided")
                            fmt_rows.append((name, f"quantized.conv2d [{e}]", lab, ofmt))
                    for xin, lab in ((u8, "channels_last"), (u8.contiguous(), "NCHW")):
                        y = torch.ops.onednn.qconv2d_pointwise(xin, xs, xz, pw, wsf, ZP(Co), b, [st] * 2, [pad] * 2, [1, 1], g, os_, oz, None, "none", [], "")
                        ofmt = "channels_last" if y.is_contiguous(memory_format=CL) else ("NCHW" if y.is_contiguous() else "strided")
                        fmt_rows.append((name, "onednn.qconv2d_pointwise", lab, ofmt))
            noise_note()
        out("### 1b. Output memory format of int8 conv\n")
        out("| shape | op [engine] | output for channels_last input | output for NCHW input |")
        out("|---|---|---|---|")
        merged = {}
        for shp, op, lab, ofmt in fmt_rows:
            merged.setdefault((shp, op), {})[lab] = ofmt
        for (shp, op), d in merged.items():
            out(f"| {shp} | {op} | {d.get('channels_last')} | {d.get('NCHW')} |")
        out()

    # =========================================================== linear (static)
    if "linear" in args.sections:
        out("### 1c. Linear (static int8) latency\n")
        out("Cells: median ms (speed-up vs fp32 `F.linear`). int8 = `quantized.linear(qx, packed, out_scale, out_zp)` "
            "per engine; `qlinear_pw` = `onednn.qlinear_pointwise` on plain uint8 with `onednn.qlinear_prepack`.\n")
        out("| shape (x · Wᵀ) | fp32 ms | fbgemm | x86 | onednn | qlinear_pw |")
        out("|---|---|---|---|---|---|")
        for M, K, Nn in ((4, 512, 1000), (8 * 128, 384, 1536)):
            xf = torch.randn(M, K).relu_()
            w = torch.randn(Nn, K) / math.sqrt(K)
            b = torch.randn(Nn) * 0.1
            qx, xs, xz = q_act(xf)
            qw, wq, ws = q_weight(w)
            yref = F.linear(xf, w, b)
            os_ = float(yref.max() - yref.min()) / 255
            oz = int(round(-float(yref.min()) / os_))
            packs = {}
            for e in ENGINES:
                torch.backends.quantized.engine = e
                packs[e] = torch.ops.quantized.linear_prepack(qw, b)
            plw = torch.ops.onednn.qlinear_prepack(wq.to(torch.int8), [M, K])
            u8 = qx.int_repr()
            wsf = ws.float()

            def mk(e):
                p = packs[e]

                def f():
                    torch.backends.quantized.engine = e
                    return torch.ops.quantized.linear(qx, p, os_, oz)
                return f
            V = {"fp32": lambda: F.linear(xf, w, b), **{e: mk(e) for e in ENGINES},
                 "pw": lambda: torch.ops.onednn.qlinear_pointwise(u8, xs, xz, plw, wsf, ZP(Nn), b, os_, oz, None, "none", [], "")}
            with torch.inference_mode():
                T = bench(V, 1.0)
            c = lambda n: f"{T.f(n, ms)} ({T.rf('fp32', n)}x)"  # noqa: E731
            out(f"| [{M},{K}]x[{Nn},{K}] | {T.f('fp32', ms)} | {c('fbgemm')} | {c('x86')} | {c('onednn')} | {c('pw')} |")
        noise_note()

    # =========================================================== 2. elementwise
    if "elem" in args.sections:
        out("### 2. Elementwise / pooling / (de)quantize on [4,64,56,56]\n")
        out("Median µs; ratio = int8 time / fp32 time (<1 = int8 faster; median of per-round paired ratios). Engine set to x86 "
            "(these ops do not depend on the engine). fp32 reference for quantize/dequantize/format-conversion is a "
            "same-shape fp32 copy (`clone`), i.e. one memory pass.\n")
        out("| op | layout | fp32 µs | int8 µs | int8/fp32 |")
        out("|---|---|---|---|---|")
        torch.backends.quantized.engine = "x86"
        shape = (4, 64, 56, 56)
        a_n = torch.randn(shape)
        b_n = torch.randn(shape)
        r_n = a_n.relu()
        rows = []
        for lay in ("channels_last", "NCHW"):
            cv = (lambda t: t.contiguous(memory_format=CL)) if lay == "channels_last" else (lambda t: t.contiguous())
            a, bb, r = cv(a_n), cv(b_n), cv(r_n)
            qa, sa, za = q_act(a, relu=False)
            qb, sb, zb = q_act(bb, relu=False)
            qr, sr, zr = q_act(r)
            qa, qb, qr = cv(qa), cv(qb), cv(qr)
            so, zo = (sa + sb), 128
            ents = [
                ("quantized.add", lambda: a + bb, lambda: torch.ops.quantized.add(qa, qb, so, zo)),
                ("quantized.add_relu", lambda: torch.add(a, bb).relu_(), lambda: torch.ops.quantized.add_relu(qa, qb, so, 0)),
                ("quantized.mul", lambda: a * bb, lambda: torch.ops.quantized.mul(qa, qb, sa * sb * 8, 128)),
                ("quantized.hardswish", lambda: F.hardswish(a), lambda: torch.ops.quantized.hardswish(qa, sa, za)),
                ("sigmoid (torch.sigmoid on quint8)", lambda: torch.sigmoid(a), lambda: torch.sigmoid(qa)),
                ("max_pool2d 3x3 s2 p1", lambda: F.max_pool2d(r, 3, 2, 1), lambda: F.max_pool2d(qr, 3, 2, 1)),
                ("adaptive_avg_pool2d(1)", lambda: F.adaptive_avg_pool2d(r, 1), lambda: F.adaptive_avg_pool2d(qr, 1)),
                ("quantize_per_tensor f32->quint8", lambda: a.clone(), lambda: torch.quantize_per_tensor(a, sa, za, torch.quint8)),
                (".dequantize() quint8->f32", lambda: a.clone(), lambda: qa.dequantize()),
            ]
            if lay == "NCHW":
                ents.append(("NCHW->channels_last `.contiguous(memory_format=CL)`", lambda: a.contiguous(memory_format=CL), lambda: qa.contiguous(memory_format=CL)))
            for name, ff, fq in ents:
                with torch.inference_mode():
                    T = bench({"f": ff, "q": fq}, 0.35)
                rows.append((name, lay, T.f("f", us), T.f("q", us), T.rf("q", "f")))
        rows.sort(key=lambda r: r[0])
        for name, lay, tf, tq, rq in rows:
            out(f"| {name} | {lay} | {tf} | {tq} | {rq} |")
        noise_note()
        # output format of pooling on NCHW vs CL
        q = torch.quantize_per_tensor(r_n, 0.05, 0, torch.quint8)
        for lay, qq in (("NCHW", q), ("channels_last", q.contiguous(memory_format=CL))):
            y = F.max_pool2d(qq, 3, 2, 1)
            out(f"- quint8 max_pool2d on {lay} input -> output channels_last={y.is_contiguous(memory_format=CL)}")
        out()

    # =========================================================== 4. dynamic linear
    if "dyn" in args.sections:
        out("### 4. `quantized.linear_dynamic(x_fp32, packed, reduce_range)` (fp32 in/out, int8 weights)\n")
        out("Input = LayerNorm-like signed activations with per-feature offsets (so the per-tensor u8 zero point sits "
            "mid-range). Weights per-channel symmetric int8 [-128,127], `quantized.linear_prepack(qw, bias)` once per "
            "engine. `speed-up` = fp32 time / int8 time (median of paired per-round ratios). `err` = relative L2 error "
            "vs float64 `F.linear`; `err sim` = same error for an exact integer simulation (per-tensor asymmetric u8 "
            "activations over 0..255, or 0..127 with reduce_range, no saturation), so `err` > `err sim` means the "
            "kernel lost accuracy on its own (int16 saturation).\n")
        out("| shape | fp32 ms | engine | reduce_range | int8 ms | speed-up | err | err sim |")
        out("|---|---|---|---|---|---|---|---|")
        for M, K, Nn in ((1, 384, 1536), (1024, 384, 1536)):
            g = torch.Generator().manual_seed(1)
            xf = torch.randn(M, K, generator=g) * 0.5 + 1.0 * torch.randn(1, K, generator=g)
            w = torch.randn(Nn, K, generator=g) / math.sqrt(K)
            b = torch.randn(Nn, generator=g) * 0.1
            qw, wq, ws = q_weight(w)
            yref = F.linear(xf.double(), w.double(), b.double())
            V, err, sim = {"fp32": lambda: F.linear(xf, w, b)}, {}, {}
            for rr in (False, True):
                qmax = 127 if rr else 255
                lo, hi = min(float(xf.min()), 0.0), max(float(xf.max()), 0.0)
                sx = (hi - lo) / qmax
                zx = int(round(-lo / sx))
                xd = (torch.clamp(torch.round(xf.double() / sx) + zx, 0, qmax) - zx) * sx
                ys = F.linear(xd, wq * ws.view(-1, 1), b.double())
                sim[rr] = float((ys - yref).norm() / yref.norm())
            for e in ENGINES:
                torch.backends.quantized.engine = e
                p = torch.ops.quantized.linear_prepack(qw, b)
                for rr in (False, True):
                    def f(e=e, p=p, rr=rr):
                        torch.backends.quantized.engine = e
                        return torch.ops.quantized.linear_dynamic(xf, p, rr)
                    V[(e, rr)] = f
                    y = f().double()
                    err[(e, rr)] = float((y - yref).norm() / yref.norm())
            with torch.inference_mode():
                T = bench(V, 1.0)
            for e in ENGINES:
                for rr in (False, True):
                    out(f"| [{M},{K}]x[{Nn},{K}] | {T.f('fp32', ms)} | {e} | {rr} | {T.f((e, rr), ms)} | "
                        f"{T.rf('fp32', (e, rr))}x | {err[(e, rr)]:.2e} | {sim[rr]:.2e} |")
        noise_note()

    # =========================================================== 3. accuracy / saturation
    if "acc" in args.sections:
        out("### 3. Saturation / accuracy of int8 conv vs exact integer reference\n")
        out("Reference = float64 conv of the *dequantized* int tensors, requantized with the kernel's output scale/zp "
            "(round-half-even, clamp 0..255; output qparams = min/max of that reference). `>1 step` = % of outputs "
            "whose uint8 code differs from the reference by more than 1 (x86 column says which kernel the x86 engine "
            "picked on this host). `pw-f32` = `onednn.qconv2d_pointwise(..., output_dtype=torch.float32)` requantized "
            "the same way. `max` = largest code difference over all engines. SQNR (dB) vs fp32 conv of the float "
            "inputs/weights: `acc` = exact int accumulator (quantization loss of inputs+weights only), `sim u8` = "
            "reference u8 output, `kernel` = worst engine's u8 output. Weights per-output-channel symmetric; "
            "activations per-tensor min/max (`ReLU` inputs: zp=0; signed inputs: asymmetric, zp mid-range).\n")
        schemes = [("A8/W8", 255, -128, 127), ("A7/W8 (reduce_range)", 127, -128, 127), ("A8/W7", 255, -64, 63)]
        g = torch.Generator().manual_seed(123)
        k1 = torch.tensor([1., 4., 6., 4., 1.]) / 16
        K5 = k1[:, None] * k1[None, :]

        def smooth(N, C, H, relu, chan_mix=True):
            z = torch.randn(N, C, H + 4, H + 4, generator=g)
            z = F.conv2d(z, K5.expand(C, 1, 5, 5), groups=C)               # spatial smoothing
            if chan_mix:
                z = z + 0.5 * z.roll(1, 1) + 0.5 * z.roll(-1, 1)            # some cross-channel correlation
            z = z / z.std()
            gamma = torch.rand(C, generator=g) + 0.5                       # BN-like per-channel affine
            beta = torch.randn(C, generator=g) * 0.5
            z = z * gamma.view(1, C, 1, 1) + beta.view(1, C, 1, 1)
            return z.relu() if relu else z

        def kaiming(Co, Ci, k):
            return torch.randn(Co, Ci, k, k, generator=g) * math.sqrt(2.0 / (Ci * k * k))

        def student(Co, Ci, k):
            z = torch.randn(Co, Ci, k, k, generator=g)
            chi2 = (torch.randn(3, Co, Ci, k, k, generator=g) ** 2).sum(0)
            t = z / torch.sqrt(chi2 / 3.0)                                 # Student-t, 3 dof (var 3)
            return t / math.sqrt(3.0) * math.sqrt(2.0 / (Ci * k * k))

        def image_like():
            z = torch.randn(1, 3, 232, 232, generator=g)
            for _ in range(3):                                             # strongly smooth, dense, signed
                z = F.conv2d(F.pad(z, (2, 2, 2, 2), mode="reflect"), K5.expand(3, 1, 5, 5), groups=3)
            z = z[..., 4:228, 4:228]
            return (z - z.mean()) / z.std()

        cases = [  # label, x, w, stride, pad, groups, relu-input
            ("3x3 64->64 @56 N=2, ReLU-smooth x, kaiming W", smooth(2, 64, 56, True), kaiming(64, 64, 3), 1, 1, 1, True),
            ("3x3 64->64 @56 N=2, ReLU-smooth x, Student-t3 W", smooth(2, 64, 56, True), student(64, 64, 3), 1, 1, 1, True),
            ("3x3 64->64 @56 N=2, signed-smooth x (no ReLU), kaiming W", smooth(2, 64, 56, False), kaiming(64, 64, 3), 1, 1, 1, False),
            ("conv1 7x7 s2 3->64 @224, image-like signed x, kaiming W", image_like(), kaiming(64, 3, 7), 2, 3, 1, False),
            ("dw 3x3 144 @56, ReLU-smooth x, kaiming W", smooth(1, 144, 56, True, False), kaiming(144, 1, 3), 1, 1, 144, True),
            ("3x3 64->64 @56 N=2, dense uniform x (stress), kaiming W", torch.rand(2, 64, 56, 56, generator=g), kaiming(64, 64, 3), 1, 1, 1, True),
        ]

        def sqnr(ref, y):
            return 10 * math.log10(float((ref ** 2).sum()) / max(float(((y - ref) ** 2).sum()), 1e-30))

        out("| case | scheme | x86 | fbgemm | onednn | pw-f32 | max | SQNR acc | SQNR sim u8 | SQNR kernel |")
        out("|---|---|---|---|---|---|---|---|---|---|")
        for label, xf, w, st, pad, grp, relu_in in cases:
            Co = w.shape[0]
            yf = F.conv2d(xf.double(), w.double(), None, st, pad, 1, grp)
            for sname, qmax, wmin, wmax in schemes:
                qx, xs, xz = q_act(xf, qmax, relu=relu_in)
                qx = qx.contiguous(memory_format=CL)
                qw, wq, ws = q_weight(w, wmin, wmax)
                xd = (qx.int_repr().double() - xz) * xs
                yacc = F.conv2d(xd, wq * ws.view(-1, 1, 1, 1), None, st, pad, 1, grp)
                lo, hi = min(float(yacc.min()), 0.0), max(float(yacc.max()), 0.0)
                os_ = (hi - lo) / 255
                oz = int(min(255, max(0, round(-lo / os_))))
                qref = torch.clamp(torch.round(yacc / os_) + oz, 0, 255)
                res = {}
                for e in ENGINES:
                    p = prepack(e, qw, None, st, pad, grp)
                    torch.backends.quantized.engine = e
                    res[e] = torch.ops.quantized.conv2d(qx, p, os_, oz).int_repr().double()
                u8 = qx.int_repr().contiguous(memory_format=CL)
                pwp = torch.ops.onednn.qconv_prepack(wq.to(torch.int8), ws.float(), xs, xz, [st] * 2, [pad] * 2, [1, 1], grp, list(u8.shape))
                yf32 = torch.ops.onednn.qconv2d_pointwise(u8, xs, xz, pwp, ws.float(), ZP(Co), None, [st] * 2, [pad] * 2, [1, 1], grp,
                                                          1.0, 0, torch.float32, "none", [], "").double()
                res["pw"] = torch.clamp(torch.round(yf32 / os_) + oz, 0, 255)
                frac = {k: float(((v - qref).abs() > 1).double().mean()) * 100 for k, v in res.items()}
                mx = max(int((v - qref).abs().max()) for v in res.values())
                worst = min(sqnr(yf, (v - oz) * os_) for v in res.values())
                out(f"| {label} | {sname} | {frac['x86']:.3f}% [{x86_conv_backend(grp)}] | {frac['fbgemm']:.3f}% | "
                    f"{frac['onednn']:.3f}% | {frac['pw']:.3f}% | {mx} | {sqnr(yf, yacc):.2f} | "
                    f"{sqnr(yf, (qref - oz) * os_):.2f} | {worst:.2f} |")
        out()
    out(f"_run `{args.label}` took {time.perf_counter() - t_start:.0f} s_\n")


# --------------------------------------------------------------------------- aggregation
def aggregate(paths) -> None:
    """Merge several saved outputs of this script: per table cell, the median over runs of the values
    that were not flagged `~` (flag kept only if every run was flagged).  Non-numeric cells (and the
    deterministic accuracy table) are taken from the first run.  Tables are matched by heading; a
    heading that occurs twice in one file (e.g. the native accuracy contrast) gets a `(2)` suffix."""
    import re
    num = re.compile(r"^(-?[0-9.]+(?:e-?\d+)?)(~?)(x?)(?: \(([0-9.]+)(~?)x\))?( \[[a-z0-9]+\])?$")
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
            key = tuple(None if num.match(c) else c for c in cells)
            tables[h].setdefault(key, []).append(cells)

    def med(ms, iv, ifl):
        good = [float(m.group(iv)) for m in ms if m.group(iv) is not None and not m.group(ifl)]
        bad = [float(m.group(iv)) for m in ms if m.group(iv) is not None and m.group(ifl)]
        return (statistics.median(good), "") if good else (statistics.median(bad), "~")

    def cell(vals):
        ms = [num.match(v) for v in vals]
        if not all(ms) or "Saturation" in cur:
            return vals[0]
        v, f = med(ms, 1, 2)
        s0 = ms[0].group(1)
        txt = f"{v:.2e}" if "e" in s0 else f"{v:.{len(s0.split('.')[1]) if '.' in s0 else 0}f}"
        txt += f + ms[0].group(3)
        if ms[0].group(4) is not None:
            r, fr = med(ms, 4, 5)
            txt += f" ({r:.2f}{fr}x)"
        return txt + (ms[0].group(6) or "")

    for cur, rows in tables.items():
        print(cur + "\n")
        print("| " + " | ".join(headers[cur]) + " |")
        print("|" + "---|" * len(headers[cur]))
        for runs in rows.values():
            print("| " + " | ".join(cell(list(c)) for c in zip(*runs)) + " |")
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
