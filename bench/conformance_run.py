"""One conformance job: a model x backend x mode compiled by qcompile and by the backend's peer tool.

Every step is measured separately and a failure is recorded as ``"ExceptionType: first line"`` plus the
innermost qcompile frame of the traceback (``where``); a job never raises.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
import traceback

import torch

from conformance_macs import float_total
from conformance_models import ALL
from conformance_peers import PEERS, ort_feeds, ort_session, run_pte

N_CALIB, HELD_OUT_SEED, N_HELD = 4, 100, 4
# SQNR is pooled over N_HELD held-out inputs (total signal over total noise): on one input of these
# random-weight models it swings by up to 7 dB between inputs, for qcompile and the peers alike.
EXCLUDED = "float: excluded by user"  # every other "float: ..." status of a report row runs in float
_EXT = {"x86": ".qc", "onnx": ".onnx", "executorch": ".pte"}


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.detach().double(), test.detach().double().reshape(ref.shape)
    noise, signal = float(((ref - test) ** 2).sum()), float((ref ** 2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal else -math.inf


def pooled(outs) -> torch.Tensor:
    """The outputs on every held-out input as one flat tensor (pooled SQNR)."""
    return torch.cat([first_tensor(o).detach().reshape(-1) for o in outs])


def first_tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else torch.utils._pytree.tree_leaves(out)[0]


def error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:400]}"


def where(e: BaseException) -> str:
    """The innermost frame in qcompile's own code (passes/, backends/, qcompile/), else the innermost frame."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if any(p in f.filename for p in ("/passes/", "/backends/", "/qcompile/"))
            and "site-packages" not in f.filename]
    f = (ours or frames or [None])[-1]
    if f is None:
        return ""
    tail = "/".join(f.filename.split("/")[-2:])
    return f"{tail}:{f.lineno} ({f.name})"


class Data:
    """Model, example / calibration / held-out inputs and the float reference, built once per model."""

    def __init__(self, name: str, n_calib: int = N_CALIB):
        self.spec = ALL[name]
        self.model = self.spec.build(seed=0)
        self.example = self.spec.inputs(0)
        self.calib = [self.spec.inputs(1 + i) for i in range(n_calib)]
        self.helds = [self.spec.inputs(HELD_OUT_SEED + i) for i in range(N_HELD)]
        self.held = self.helds[0]  # MACs, latency
        with torch.no_grad():
            self.float_out = pooled([self.model(*h) for h in self.helds])
        self.total_macs = float_total(self.model, self.example)


def run_job(data: Data, backend: str, mode: str, timing: bool = True, peer: bool = True) -> dict:
    r = {"model": data.spec.name, "kind": data.spec.kind, "backend": backend, "mode": mode,
         "float_macs": data.total_macs}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        art = _qcompile(data, backend, mode, r)
        if art is not None:
            _load_back(art, data, backend, tmp, r)
            r.pop("_out", None)
            if timing and r.get("runs"):
                _latency(art, data, r)
        if peer:
            _peer(data, backend, mode, tmp, r)
    r["seconds"] = round(time.perf_counter() - t0, 1)
    return r


def _qcompile(data: Data, backend: str, mode: str, r: dict):
    import qcompile
    t0 = time.perf_counter()
    try:
        calib = data.calib if mode == "static" else None
        art = qcompile.compile(data.model, data.example, backend=backend, calibration=calib, mode=mode,
                               progress=False)
    except Exception as e:  # noqa: BLE001 - the suite records, never crashes
        r.update(compiles=False, error=error_text(e), where=where(e), stage="compile")
        return None
    r.update(compiles=True, compile_s=round(time.perf_counter() - t0, 1))
    rep = art.report
    r["report_mac_share"] = rep.share("macs")
    int8_macs = sum(row.macs for row in rep.rows if row.status == "int8")
    r["int8_macs"] = int8_macs
    r["mac_share"] = min(1.0, int8_macs / data.total_macs) if data.total_macs else None
    r["fallbacks"] = [[row.op, row.reason or row.status, row.macs, row.module, row.name] for row in rep.rows
                      if row.status.startswith("float") and row.status != EXCLUDED]
    r["verify"] = {k: v for k, v in rep.verify.items() if isinstance(v, (int, float, str, bool))}
    try:
        with torch.no_grad():
            out = pooled([art(*h) for h in data.helds])
        r.update(runs=True, sqnr=sqnr_db(data.float_out, out))
        r["_out"] = out
    except Exception as e:  # noqa: BLE001
        r.update(runs=False, error=error_text(e), where=where(e), stage="run")
    return art


def _load_back(art, data: Data, backend: str, tmp: str, r: dict) -> None:
    """Save in the backend's file format, load it with the runtime alone, run it, compare with ``art``."""
    path = os.path.join(tmp, "artifact" + _EXT[backend])
    try:
        art.save(path)
        if backend == "x86":
            import qcompile
            loaded = qcompile.load(path)
            with torch.no_grad():
                out = pooled([loaded(*h) for h in data.helds])
        elif backend == "onnx":
            sess = ort_session(path)
            out = pooled([torch.from_numpy(sess.run(None, ort_feeds(sess, h))[0]) for h in data.helds])
        else:
            with open(path, "rb") as f:
                out = pooled(run_pte(f.read(), data.helds))
    except Exception as e:  # noqa: BLE001
        r.update(loads=False, load_error=error_text(e), load_where=where(e))
        return
    ref = r.pop("_out", None)
    agree = sqnr_db(ref, out) if ref is not None else None
    r["load_vs_artifact_sqnr"] = agree
    r["loads"] = ref is None or agree >= 30
    if not r["loads"]:
        r["load_error"] = f"the loaded {_EXT[backend]} file's output differs from the artifact's ({agree:.1f} dB)"
    if not r.get("runs"):
        r["sqnr_loaded"] = sqnr_db(data.float_out, out)


def _latency(art, data: Data, r: dict) -> None:
    import statistics
    fns = {"q": lambda: art(*data.held), "f": lambda: data.model(*data.held)}
    times = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(10):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    q, f = statistics.median(times["q"]), statistics.median(times["f"])
    r.update(latency_ms=round(q * 1e3, 3), float_ms=round(f * 1e3, 3), latency_ratio=round(q / f, 3))


def _peer(data: Data, backend: str, mode: str, tmp: str, r: dict) -> None:
    fn = PEERS[backend]
    args = (data.model, data.example, data.calib, data.helds, mode) + ((tmp,) if backend == "onnx" else ())
    try:
        peer = fn(*args)
    except Exception as e:  # noqa: BLE001
        r.update(peer_error=error_text(e))
        return
    r.update(peer_method=peer.method, peer_sqnr=sqnr_db(data.float_out, pooled(peer.outs)),
             peer_int8_macs=peer.int8_macs,
             peer_mac_share=min(1.0, peer.int8_macs / data.total_macs) if data.total_macs else None)
