"""Timing harness and quantization helpers of bench/x86_kernels.py (imported only in its child process,
after the ISA caps are in the environment: importing torch here is what the caps must precede)."""
from __future__ import annotations

import glob
import math
import os
import random
import statistics
import time

import torch

from x86_kernels import CAP_ENV, FLAGS, HOST_AVX512, HOST_VNNI

CL = torch.channels_last
ENGINES = ["x86", "fbgemm", "onednn"]
# planned sampling budget per section (seconds) -> the schedule bench() uses to respect --max-seconds
PLAN = {"conv": 9 * 1.2 + 10 * 0.5, "linear": 2 * 1.0, "elem": 19 * 0.35, "dyn": 2 * 1.0}


def out(s=""):
    print(s, flush=True)


def ms(t):
    return f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.2f}"


def us(t):
    return f"{t * 1e6:.1f}"


def zp(n):
    return torch.zeros(n, dtype=torch.long)


def x86_conv_backend(groups: int) -> str:
    return "onednn" if (HOST_VNNI and groups <= 100) else "fbgemm"


# ------------------------------------------------------------------ machine noise
def runq_wait_ns(paths) -> int:
    """Sum over our threads of time spent runnable-but-not-running (other tenants on our CPUs)."""
    tot = 0
    for pth in paths:
        try:
            with open(pth) as fh:
                tot += int(fh.read().split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return tot


def others_busy_jiffies() -> int:
    """CPU jiffies used by everything except this process (system total minus our utime+stime)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    busy = f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)
    with open("/proc/self/stat") as fh:
        st = fh.read().rsplit(")", 1)[1].split()
    return busy - int(st[11]) - int(st[12])


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


class Harness:
    """One child run: its options, the sampling schedule, and the noise record printed under each table."""

    def __init__(self, args):
        self.args, self.quick, self.t_start = args, args.quick, time.perf_counter()
        plan = sum(v for k, v in PLAN.items() if k in args.sections) * (0.25 if args.quick else 1) or 1.0
        self.schedule = {"spent": 0.0, "plan": plan}
        self.noise: list = []  # (clean fraction, p75/p25 spread of clean samples) per variant
        self.waited = 0.0
        self.sched = sorted(glob.glob("/proc/self/task/*/schedstat"))

    def header(self) -> None:
        caps = {k: os.environ.get(k) for k in CAP_ENV}
        out(f"## Run: `{self.args.label}`\n")
        out(f"- torch {torch.__version__}, threads={torch.get_num_threads()}, "
            f"ATen CPU capability={torch.backends.cpu.get_cpu_capability()}, "
            f"quantized engines={torch.backends.quantized.supported_engines}")
        out(f"- host flags: avx2={'avx2' in FLAGS} avx512f={HOST_AVX512} avx512_vnni={HOST_VNNI} "
            f"amx_int8={'amx_int8' in FLAGS}; caps: {caps}")
        out(f"- x86 engine conv routing on this host: "
            f"{'oneDNN for groups<=100 (VNNI seen by cpuinfo)' if HOST_VNNI else 'fbgemm (no VNNI)'}"
            "; on an AVX2-only CPU x86 conv == fbgemm. x86 linear == fbgemm everywhere.\n")

    def wait_for_quiet(self, deadline: float, window: float = 0.02, max_jiffies: int = 1) -> None:
        """Sleep until a `window` passes in which other tenants used <= max_jiffies of CPU, or `deadline`."""
        t0 = time.perf_counter()
        while time.perf_counter() < deadline:
            b0 = others_busy_jiffies()
            time.sleep(window)
            if others_busy_jiffies() - b0 <= max_jiffies:
                break
        self.waited += time.perf_counter() - t0

    def bench(self, variants: dict, budget_s: float, target_sample_s: float = 1e-4,
              min_rounds: int = 15, want_clean: int = 15, max_rounds: int = 400) -> Timings:
        """Interleaved, shuffled rounds of short samples (one call each for ops >= 0.1 ms).

        The machine is shared: with 2 OpenMP threads on 2 vCPUs, a neighbour process stalls a parallel
        region for a whole scheduler slice (ms), so a 0.2 ms op can read 7 ms.  Each sample therefore
        also records the run-queue wait of our threads (/proc/self/task/*/schedstat); samples that
        waited > 20 us + 3 % are dropped, and medians are taken over the clean ones.  Sampling goes on
        until every variant has `want_clean` clean samples (or 3x the budget has elapsed)."""
        if self.quick:
            budget_s, min_rounds, want_clean = budget_s / 4, 5, 5
        # stay inside --max-seconds: once behind schedule, no quiet-window waits and no 3x extension
        self.schedule["spent"] += budget_s
        elapsed = time.perf_counter() - self.t_start
        behind = elapsed > self.schedule["spent"] / self.schedule["plan"] * self.args.max_seconds
        limits = (min(min_rounds, 7) if behind else min_rounds, want_clean, max_rounds, 1.0 if behind else 3.0)
        inner, est = _calibrate(variants, target_sample_s)
        self.sched[:] = sorted(glob.glob("/proc/self/task/*/schedstat"))
        samples = Timings({n: [] for n in variants})
        for n in variants:
            samples["_raw_" + str(n)] = []
        self._sample(variants, samples, inner, est, budget_s, behind, limits)
        for n in variants:
            v = dict.__getitem__(samples, n)
            c = [x for x in v if x is not None]
            sp = statistics.quantiles(c, n=4) if len(c) >= 4 else [1, 1, float("nan")]
            self.noise.append((len(c) / len(v), sp[2] / sp[0]))
        return samples

    def _sample(self, variants, samples, inner, est, budget_s, behind, limits) -> None:
        min_rounds, want_clean, max_rounds, slack = limits
        names = list(variants)
        t_begin, rounds, last_gate = time.perf_counter(), 0, 0.0
        while True:
            if time.perf_counter() - last_gate > 0.2:  # measure in quiet windows when there are any
                if not behind:
                    self.wait_for_quiet(time.perf_counter() + 0.25 * budget_s)
                last_gate = time.perf_counter()
            order = names[:]
            random.shuffle(order)
            for n in order:
                if est[n] >= 1e-3 and not behind:  # long samples: also wait for a quiet window right before each
                    self.wait_for_quiet(time.perf_counter() + 0.05, window=0.01, max_jiffies=0)
                self._one_sample(samples, n, variants[n], inner[n])
            rounds += 1
            el = time.perf_counter() - t_begin
            n_clean = min(sum(x is not None for x in dict.__getitem__(samples, n)) for n in names)
            if rounds >= min_rounds and ((el >= budget_s and n_clean >= want_clean) or el >= slack * budget_s
                                         or (rounds >= max_rounds and n_clean >= 5)):
                return

    def _one_sample(self, samples, n, fn, k) -> None:
        w0 = runq_wait_ns(self.sched)
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        t1 = time.perf_counter()
        waited = (runq_wait_ns(self.sched) - w0) * 1e-9
        dt = t1 - t0
        dict.__getitem__(samples, "_raw_" + str(n)).append(dt / k)
        dict.__getitem__(samples, n).append(dt / k if waited <= 20e-6 + 0.03 * dt else None)

    def noise_note(self) -> None:
        if self.noise:
            cf = [c for c, _ in self.noise]
            sp = [x for _, x in self.noise if x == x]
            out(f"\n_noise: clean samples (no run-queue wait) median {statistics.median(cf) * 100:.0f}%, "
                f"worst variant {min(cf) * 100:.0f}%; p75/p25 of clean samples median "
                f"{statistics.median(sp) if sp else float('nan'):.2f}, worst {max(sp) if sp else float('nan'):.2f}; "
                f"load avg {os.getloadavg()[0]:.1f}; {self.waited:.0f} s spent waiting for quiet windows so far. "
                f"`~` = fewer than 5 clean samples: 10th percentile of contaminated samples shown, unreliable_\n")
        self.noise.clear()


def _calibrate(variants: dict, target_sample_s: float) -> tuple[dict, dict]:
    """Calls per sample (so a sample lasts ~target_sample_s) and the estimated sample time, per variant."""
    inner, est = {}, {}
    for n, fn in variants.items():
        fn()
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        inner[n] = max(1, int(math.ceil(target_sample_s / max(min(ts), 1e-7))))
        est[n] = inner[n] * min(ts)
    return inner, est


# ------------------------------------------------------------------ quantization helpers
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
