#!/usr/bin/env python3
"""ExecuTorch backend on the zoo: delegation, sizes, and parity with the reference graph, end to end and
layer by layer (``qcompile.backends.executorch.taps.layer_parity``). Prints a markdown table.

    python3 bench/executorch_zoo_parity.py                          # all four zoo models (~3 min)
    python3 bench/executorch_zoo_parity.py digits_cnn resnet18      # a subset
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings

import torch

MODELS = ("digits_cnn", "resnet18", "mobilenet_v2", "bert_encoder")
HEAD = ("| model | compile s | e2e within 1 step | e2e max steps | SQNR runtime vs ref dB | SQNR runtime / ref vs float dB "
        "| layers within 1 step (exact) | forced outputs within 1 step | delegated nodes | conv/linear delegated "
        "(int8) | portable nodes | .pte MB | int8 weight share |")


def row(name: str) -> str:
    import qcompile
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _fixtures import zoo
    from qcompile.backends.executorch.taps import layer_parity
    model, inputs = zoo.get_model(name)
    t0 = time.perf_counter()
    art = qcompile.compile(model, inputs, backend="executorch", calibration=zoo.calibration_samples(name),
                           progress=False)
    seconds = time.perf_counter() - t0
    v, s = art.report.verify, layer_parity(art).summary()
    return (f"| {name} | {seconds:.0f} | {v['within_one_step']:.3f} | {v['max_error_in_steps']:.2f} | "
            f"{v['sqnr_vs_reference_db']:.1f} | {v['sqnr_vs_float_db']:.2f} / {v['reference_sqnr_vs_float_db']:.2f} | "
            f"{s['layer_values_within_one_step']:.4f} ({s['layer_exact_share']:.4f}) | "
            f"{s['forced_outputs_within_one_step']:.3f} | {v['delegated_node_share']:.1%} | "
            f"{v['delegated_conv_linear_share']:.0%} ({v['int8_conv_linear_share']:.1%}) | {v['portable_nodes']} | "
            f"{v['pte_bytes'] / 1e6:.2f} | {v['int8_weight_share']:.3f} |")


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or MODELS
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)  # export / calibration: 2 intra-op threads thrash on a shared 2-core machine
    print(HEAD)
    print("|" + "---|" * HEAD.count(" |"))
    for name in names:
        print(row(name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
