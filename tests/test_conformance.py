"""Conformance on Hugging Face architectures (bench/conformance.py).

The default run compiles a few tiny models in-process and asserts that they compile, run, load back from
their file and keep SQNR >= 15 dB against the float model. The whole suite (every model x backend x mode,
with the peers) is the ``slow`` test; it asserts the judging criteria of issue 11.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs transformers (pip install -e .[hf])")

SQNR_FLOOR = 15.0
# Models that compile, run and load on today's code; chosen for speed (each job takes a few seconds).
FAST = [("resnet", "x86", "static"), ("bert", "x86", "static"), ("bert", "x86", "dynamic"),
        ("resnet", "executorch", "static")]


@pytest.fixture(scope="module")
def data():
    import torch
    from conformance_run import Data
    torch.manual_seed(0)
    cache = {}
    return lambda name: cache.setdefault(name, Data(name))


@pytest.mark.parametrize("model,backend,mode", FAST)
def test_fast_subset(data, model, backend, mode):
    if backend == "executorch" and importlib.util.find_spec("executorch") is None:
        pytest.skip("needs executorch")
    from conformance_run import run_job
    r = run_job(data(model), backend, mode, timing=False, peer=False)
    assert r["compiles"], r.get("error")
    assert r["runs"], r.get("error")
    assert r["loads"], r.get("load_error")
    assert r["sqnr"] >= SQNR_FLOOR, f"{model}/{backend}/{mode}: SQNR {r['sqnr']:.1f} dB"
    assert 0 < r["mac_share"] <= 1


def test_mac_formula_counts_linear_conv_and_attention():
    import torch
    from conformance_macs import float_total

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, groups=1)
            self.lin = torch.nn.Linear(8, 4)

        def forward(self, x):
            y = self.conv(x)                                   # 2*8*5*5 outputs x 3*3*3
            q = y.flatten(2).transpose(1, 2).unsqueeze(1)        # [2, 1, 25, 8]
            a = torch.nn.functional.scaled_dot_product_attention(q, q, q)  # 2*25*25*8 twice
            return self.lin(a)                                 # 2*25*4 outputs x 8
    expected = 2 * 8 * 25 * 27 + 2 * (2 * 25 * 25 * 8) + 2 * 25 * 4 * 8
    assert float_total(Tiny(), (torch.randn(2, 3, 5, 5),)) == expected


def test_dead_gemms_count_for_no_tool():
    """A linear whose output nobody reads (BERT's pooler behind a last-hidden-state wrapper) runs in eager
    (forward hooks see it) and stays in the torch.export graph, but qcompile's graph drops it: no count has it."""
    import torch
    from conformance_macs import dead_gemm_modules, float_total
    from conformance_peers import _x86_dynamic

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.pooler = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            h = self.body(x)
            self.pooler(h[:, 0])                    # computed, then dropped
            return h
    x = (torch.randn(2, 5, 8),)
    model = Pooled().eval()
    assert float_total(model, x) == 2 * 5 * 8 * 8 and dead_gemm_modules(model, x) == {"pooler"}
    assert _x86_dynamic(model, [x]).int8_macs == 2 * 5 * 8 * 8


def test_report_summary_counts_failures_as_losses():
    from conformance_report import render, summary
    ok = {"model": "a", "backend": "x86", "mode": "static", "compiles": True, "runs": True, "loads": True,
          "sqnr": 30.0, "peer_sqnr": 25.0, "mac_share": 1.0, "peer_mac_share": 1.0, "fallbacks": []}
    bad = {"model": "b", "backend": "onnx", "mode": "static", "compiles": False, "error": "UnsupportedError: x",
           "peer_sqnr": 20.0, "peer_mac_share": 0.9}
    lines = "\n".join(summary([ok, bad]))
    assert "1/2 (50%)" in lines and "qcompile SQNR ≥ peer SQNR**: 1/2" in lines
    assert "UnsupportedError: x" in render([ok, bad])


@pytest.mark.slow
def test_whole_suite_meets_issue_criteria(tmp_path):
    """Every model x backend compiles, loads and runs; SQNR >= 15 dB everywhere; qcompile's SQNR >= the
    peer's on >= 90 % of pairs; int8 MAC share >= the peer's everywhere."""
    import conformance
    from conformance_report import passed
    results, out = str(tmp_path / "results.jsonl"), str(tmp_path / "conformance.md")
    assert conformance.main(["--results", results, "--out", out]) == 0
    rows = list(conformance.read_results(results).values())
    failing = [f"{r['model']}/{r['backend']}/{r['mode']}: {r.get('error') or r.get('load_error')}"
               for r in rows if not passed(r)]
    assert not failing, "\n".join(failing)
    low = [f"{r['model']}/{r['backend']}/{r['mode']}: {r['sqnr']:.1f}" for r in rows if r["sqnr"] < SQNR_FLOOR]
    assert not low, low
    wins = sum(r.get("peer_sqnr") is None or r["sqnr"] >= r["peer_sqnr"] for r in rows)
    assert wins >= 0.9 * len(rows), f"qcompile SQNR >= peer on {wins}/{len(rows)}"
    fewer = [f"{r['model']}/{r['backend']}/{r['mode']}" for r in rows
             if r.get("peer_mac_share") is not None and r["mac_share"] + 1e-3 < r["peer_mac_share"]]
    assert not fewer, fewer
    assert all(not math.isnan(r["sqnr"]) for r in rows)
