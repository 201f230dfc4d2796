"""Latency percentiles per batch size (warm-up, candidate and reference interleaved), peak memory, model bytes.

Noise: the machine is shared, so both models are timed in alternating order within one loop and the
speed-up is the median of per-pair ratios (with its interquartile range), not a ratio of two means."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .errors import QCompileError


@dataclass(frozen=True)
class TimingOptions:
    warmup: int = 3
    min_repeats: int = 10
    max_repeats: int = 200
    budget_s: float = 1.0  # per batch size, both models together, after min_repeats


def runtime_name(model) -> str:
    backend = getattr(model, "backend", None)
    if backend is not None and hasattr(backend, "runtime_name"):
        return backend.runtime_name()
    dtype = next((p.dtype for p in model.parameters()), torch.float32) if isinstance(model, torch.nn.Module) \
        else None
    return f"PyTorch {torch.__version__.split('+')[0]} eager" + (f" ({str(dtype).replace('torch.', '')})"
                                                                 if dtype is not None else "")


def model_bytes(model) -> int | None:
    """Bytes the model stores: the artifact's stored constants (or its runtime file), or the module's
    parameters and buffers."""
    if getattr(model, "file_bytes", None):
        return int(model.file_bytes)
    report = getattr(model, "report", None)
    if report is not None:
        program = getattr(getattr(model, "lowered", None), "program", None)
        if program is not None and getattr(program, "buffer", None) is not None:
            return len(program.buffer)
        if report.verify.get("onnx_file_bytes"):
            return int(report.verify["onnx_file_bytes"])
        return report.sizes.get("stored_bytes") or report.sizes.get("total_bytes")
    if isinstance(model, torch.nn.Module):
        seen = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        return sum(t.numel() * t.element_size() for t in seen.values())
    return None


def make_batch(all_batches, size: int):
    """(args, kwargs) of ``size`` rows gathered from the evaluation batches (repeated if there are fewer)."""
    b0 = all_batches[0]
    parts_a = [[] for _ in b0.args]
    parts_k = {k: [] for k in b0.kwargs}
    have = 0
    while have < size:
        for b in all_batches:
            for i, a in enumerate(b.args):
                parts_a[i].append(a)
            for k, v in b.kwargs.items():
                parts_k[k].append(v)
            have += b.n
            if have >= size:
                break
    args = tuple(torch.cat(p)[:size] for p in parts_a)
    return args, {k: torch.cat(v)[:size] for k, v in parts_k.items()}


def _percentiles(times_s: list[float], batch: int) -> dict:
    t = torch.tensor(times_s, dtype=torch.float64) * 1e3
    q = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"p50_ms": round(q[0], 4), "p90_ms": round(q[1], 4), "p99_ms": round(q[2], 4),
            "max_ms": round(t.max().item(), 4), "throughput_per_s": round(batch / (q[0] / 1e3), 2),
            "runs": len(times_s), "samples_ms": [round(x, 4) for x in t.tolist()]}


def _once(model, args, kwargs) -> float:
    t0 = time.perf_counter()
    model(*args, **kwargs)
    return time.perf_counter() - t0


@torch.no_grad()
def time_pair(candidate, reference, args, kwargs, opts: TimingOptions) -> tuple[list, list]:
    for _ in range(opts.warmup):
        candidate(*args, **kwargs)
        reference(*args, **kwargs)
    tc, tr = [], []
    start = time.perf_counter()
    for i in range(opts.max_repeats):
        if i >= opts.min_repeats and time.perf_counter() - start > opts.budget_s:
            break
        if i % 2:  # alternate which model runs first, so neither always gets the warmer cache
            tr.append(_once(reference, args, kwargs))
            tc.append(_once(candidate, args, kwargs))
        else:
            tc.append(_once(candidate, args, kwargs))
            tr.append(_once(reference, args, kwargs))
    return tc, tr


def measure(candidate, reference, all_batches, batch_sizes: tuple, opts: TimingOptions):
    """({"candidate"|"reference": {batch: percentiles}}, {batch: speed-up stats}, peak memory)."""
    latency = {"candidate": {}, "reference": {}}
    speedup = {}
    for size in batch_sizes:
        args, kwargs = make_batch(all_batches, size)
        try:
            tc, tr = time_pair(candidate, reference, args, kwargs, opts)
        except Exception as e:  # noqa: BLE001 - e.g. an artifact exported for a fixed batch size
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            latency["candidate"][size] = latency["reference"][size] = {"error": msg}
            continue
        latency["candidate"][size] = _percentiles(tc, size)
        latency["reference"][size] = _percentiles(tr, size)
        ratios = torch.tensor([r / c for r, c in zip(tr, tc)], dtype=torch.float64)
        q = torch.quantile(ratios, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        speedup[size] = {"median": round(q[1], 3), "iqr": [round(q[0], 3), round(q[2], 3)]}
    largest = max(batch_sizes) if batch_sizes else 1
    args, kwargs = make_batch(all_batches, largest)
    memory = {"batch": largest, "candidate_peak_bytes": peak_rss_delta(candidate, args, kwargs),
              "reference_peak_bytes": peak_rss_delta(reference, args, kwargs)}
    return latency, speedup, memory


def _status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise QCompileError(f"/proc/self/status has no {field_name}")


def _trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may then read low
        pass


@torch.no_grad()
def peak_rss_delta(model, args, kwargs) -> int | None:
    """Growth of the process's peak resident memory while running ``model`` (Linux: the high-water mark
    is reset through /proc/self/clear_refs first, after glibc's malloc_trim returned freed pages). Counts
    every allocator (PyTorch, ONNX Runtime, ExecuTorch) but not memory a runtime keeps cached between runs
    (an arena already resident reads as 0); None where the kernel does not offer it."""
    try:
        _trim()  # return freed heap pages to the kernel, so the run's working memory faults in anew
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
        for _ in range(2):
            model(*args, **kwargs)
        return max(0, _status("VmHWM") - base)
    except (OSError, QCompileError, ValueError):
        return None
    except Exception:  # noqa: BLE001 - the model cannot run this batch size
        return None
