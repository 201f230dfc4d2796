#!/usr/bin/env python3
"""Conformance suite: Hugging Face architectures nobody on this project wrote, compiled by qcompile for
every backend and quantized by each backend's peer tool on the same model and data.

    python bench/conformance.py                                  # everything -> docs/conformance.md
    python bench/conformance.py --models bert,resnet --backends x86,executorch --out /tmp/c.md
    python bench/conformance.py --timeout 600 --results /tmp/conformance.jsonl   # resumable
    python bench/conformance.py --outside --out /tmp/outside.md   # architectures kept out of the suite

Each model runs in a worker subprocess (a crash or hang in a runtime costs one job, not the run): the
worker appends one JSON line per (model, backend, mode) job to ``--results``; a job that exceeds
``--timeout`` seconds or kills its worker is recorded as such and the worker restarts with the jobs left.
Jobs already in ``--results`` are skipped (``--fresh`` starts over). Text models run in static and
dynamic mode, the others in static mode. What is measured: bench/conformance_run.py; the peers:
bench/conformance_peers.py; the MAC formula: bench/conformance_macs.py.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from conformance_models import ALL, MODELS, OUTSIDE  # noqa: E402

BACKENDS = ("x86", "onnx", "executorch")
DEFAULT_OUT = os.path.join(HERE, "..", "docs", "conformance.md")


def jobs_for(models, backends, only_modes=("static", "dynamic")) -> list[tuple]:
    out = []
    for m in models:
        modes = ("static", "dynamic") if ALL[m].kind == "text" else ("static",)
        out += [(m, b, mode) for b in backends for mode in modes if mode in only_modes]
    return out


def key(r) -> tuple:
    return (r["model"], r["backend"], r["mode"]) if isinstance(r, dict) else tuple(r)


def read_results(path: str) -> dict:
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[key(r)] = r
    return done


def _append(path: str, r: dict) -> None:
    """One write() with O_APPEND: two runs may share a results file (e.g. one going backwards)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(r, default=str) + "\n").encode())
    finally:
        os.close(fd)


# -- worker side ---------------------------------------------------------------------------------------
def worker(model: str, jobs: list[str], results: str, progress: str) -> int:
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from conformance_run import Data, error_text, run_job
    try:
        data = Data(model)
    except Exception as e:  # noqa: BLE001 - the float model itself does not build / export
        for j in jobs:
            b, mode = j.split(":")
            _append(results, {"model": model, "kind": ALL[model].kind, "backend": b, "mode": mode,
                              "compiles": False, "error": "float model: " + error_text(e), "stage": "float"})
        return 0
    for j in jobs:
        b, mode = j.split(":")
        with open(progress, "w") as f:
            json.dump({"job": j, "t": time.time()}, f)
        _append(results, run_job(data, b, mode))
    return 0


# -- parent side ---------------------------------------------------------------------------------------
def run_model(model: str, todo: list[tuple], results: str, timeout: float) -> None:
    progress = results + f".{model}.progress"
    while todo:
        if os.path.exists(progress):
            os.remove(progress)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", model, "--jobs",
               ",".join(f"{b}:{m}" for _, b, m in todo), "--results", results, "--progress", progress]
        log = results + f".{model}.stderr"  # a file, not a pipe: a full pipe would block a chatty worker
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        started = time.time()
        killed = None
        while proc.poll() is None:
            time.sleep(1)
            current = _current(progress)
            since = current[1] if current else started
            if time.time() - since > timeout + (0 if current else 300):  # model build + export: 300 s grace
                os.killpg(proc.pid, signal.SIGKILL)
                killed = current
        with open(log, errors="replace") as f:
            stderr = f.read()
        done = read_results(results)
        left = [t for t in todo if t not in done]
        if not left:
            return
        current = _current(progress)
        if current is None:  # died before starting a job: record every job left
            _fail_all(model, left, results, _tail(stderr) or f"worker exited with {proc.returncode}")
            return
        job = (model, *current[0].split(":"))
        reason = (f"Timeout: no result after {timeout:.0f} s" if killed else
                  f"WorkerCrash: exit code {proc.returncode} ({_signal_name(proc.returncode)}); {_tail(stderr)}")
        _append(results, {"model": model, "kind": ALL[model].kind, "backend": job[1], "mode": job[2],
                          "compiles": False, "error": reason, "stage": "timeout" if killed else "crash"})
        todo = [t for t in left if t != job]


def _current(progress: str):
    try:
        with open(progress) as f:
            p = json.load(f)
        return p["job"], p["t"]
    except (OSError, ValueError):
        return None


def _fail_all(model, jobs, results, reason):
    for _, b, mode in jobs:
        _append(results, {"model": model, "kind": ALL[model].kind, "backend": b, "mode": mode,
                          "compiles": False, "error": reason, "stage": "worker"})


def _signal_name(rc) -> str:
    if rc is not None and rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            pass
    return "no signal"


def _tail(stderr: str) -> str:
    lines = [ln for ln in (stderr or "").splitlines() if ln.strip() and "Failed to load" not in ln]
    return lines[-1][:300] if lines else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help=f"comma-separated subset of: {','.join(ALL)}")
    p.add_argument("--outside", action="store_true",
                   help=f"the architectures kept out of the suite ({','.join(OUTSIDE)}) instead of the suite")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown table (default docs/conformance.md)")
    p.add_argument("--results", default="/tmp/conformance.jsonl", help="JSON lines, one per job (resumable)")
    p.add_argument("--timeout", type=float, default=400, help="seconds per model x backend x mode job")
    p.add_argument("--modes", default="static,dynamic", help="static and/or dynamic (text models run both)")
    p.add_argument("--fresh", action="store_true", help="ignore jobs already in --results")
    p.add_argument("--merge", default="", help="comma-separated results files of parallel runs to include")
    p.add_argument("--render-only", action="store_true", help="write --out from the results, run nothing")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--jobs", help=argparse.SUPPRESS)
    p.add_argument("--progress", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.jobs.split(","), a.results, a.progress)
    models = a.models.split(",") if a.models else list(OUTSIDE if a.outside else MODELS)
    unknown = [m for m in models if m not in ALL]
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {', '.join(ALL)}")
    backends = a.backends.split(",")
    if a.fresh and os.path.exists(a.results):
        os.remove(a.results)
    wanted = jobs_for(models, backends, a.modes.split(","))
    for m in ([] if a.render_only else models):
        todo = [j for j in wanted if j[0] == m and j not in read_results(a.results)]
        if todo:
            t0 = time.time()
            run_model(m, todo, a.results, a.timeout)
            print(f"{m}: {len(todo)} job(s) in {time.time() - t0:.0f} s", flush=True)
    from conformance_report import render
    done = read_results(a.results)
    for extra in filter(None, a.merge.split(",")):
        done.update(read_results(extra))
    rows = [done[j] for j in wanted if j in done]
    with open(a.out, "w") as f:
        f.write(render(rows, " ".join(sys.argv[1:] if argv is None else argv)))
    print(f"wrote {a.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
