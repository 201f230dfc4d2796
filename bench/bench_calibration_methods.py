"""Activation calibration methods side by side on the conformance models: held-out SQNR against float.

For each model of bench/conformance_models.py (random seeded weights, 4 calibration samples, as the
conformance suite), static int8 with every activation observer given: ``mse`` (the default), ``auto``
(qcompile.passes.range_choice: per tensor, by the output error on held-back calibration samples), ``minmax``,
``percentile``, ``entropy``. SQNR of the first output over 8 held-out inputs (energy over all of them), so one
unlucky input does not decide. Accuracy only: no latency is measured.

    python bench/bench_calibration_methods.py [--models a,b] [--observers mse,auto,minmax] [--backend x86]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine_line, table  # noqa: E402
from conformance_models import MODELS  # noqa: E402
from conformance_run import Data  # noqa: E402

import qcompile  # noqa: E402
from qcompile import ActivationSpec  # noqa: E402

warnings.filterwarnings("ignore")
HELD_OUT = 8


def held_out_sqnr(art, model, inputs) -> float:
    signal = noise = 0.0
    with torch.no_grad():
        for args in inputs:
            ref = torch.utils._pytree.tree_leaves(model(*args))[0].double()
            out = torch.utils._pytree.tree_leaves(art(*args))[0].double()
            signal += float((ref ** 2).sum())
            noise += float(((ref - out) ** 2).sum())
    return 10 * math.log10(signal / noise) if noise else math.inf


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--observers", default="mse,auto,minmax")
    ap.add_argument("--backend", default="x86")
    args = ap.parse_args(argv)
    observers = args.observers.split(",")
    print(f"{machine_line()}; backend {args.backend}; held-out SQNR dB over {HELD_OUT} inputs")
    rows, diffs = [], {o: [] for o in observers[1:]}
    for name in args.models.split(","):
        d = Data(name)
        inputs = [d.spec.inputs(1000 + i) for i in range(HELD_OUT)]
        vals = []
        for obs in observers:
            try:
                art = qcompile.compile(d.model, d.example, backend=args.backend, calibration=d.calib,
                                       activations=ActivationSpec(observer=obs), verify=False, progress=False)
                vals.append(held_out_sqnr(art, d.model, inputs))
            except Exception as e:  # noqa: BLE001 - the table records it
                vals.append(type(e).__name__)
        for obs, v in zip(observers[1:], vals[1:]):
            if isinstance(v, float) and isinstance(vals[0], float):
                diffs[obs].append(v - vals[0])
        rows.append([name] + [f"{v:.2f}" if isinstance(v, float) else v for v in vals])
        print(" ".join(rows[-1]), flush=True)
    print(table(rows, ["model"] + observers))
    for obs, ds in diffs.items():
        if ds:
            print(f"{obs} vs {observers[0]}: better on {sum(x > 0 for x in ds)}, worse on {sum(x < 0 for x in ds)} "
                  f"of {len(ds)}, mean {sum(ds) / len(ds):+.2f} dB, range {min(ds):+.2f} .. {max(ds):+.2f}")


if __name__ == "__main__":
    main()
