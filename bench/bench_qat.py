"""QAT training-step cost on the ResNet-18 shape: qcompile prepare_qat vs torch.ao prepare_qat_fx vs float.

    python bench/bench_qat.py [--batch 8] [--res 112] [--repeats 9] [--threads 2]

One step = forward + cross-entropy + backward + SGD(momentum) step, in training mode (batch-norm live).
Candidates are timed round by round (interleaved) and the median is reported, so machine noise hits every
row alike. Rows: float eager (the baseline), qcompile QAT (8-bit weights, and 4-bit with LSQ), qcompile's
captured graph with fake-quant and observers off (the cost of the graph and the conv-BN formulation), and
torch.ao's FX QAT (``prepare_qat_fx`` with ``get_default_qat_qconfig_mapping("x86")``).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved, machine_line, table  # noqa: E402

import qcompile  # noqa: E402
from qcompile.demo_shapes import image_batches, resnet18_shaped  # noqa: E402

warnings.filterwarnings("ignore")


def make_step(model, x, y, lr=1e-3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def torch_ao_qat(model, x):
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    t0 = time.perf_counter()
    prepared = prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (x,))
    return prepared, time.perf_counter() - t0


def qcompile_qat(model, x, **kw):
    t0 = time.perf_counter()
    qat = qcompile.prepare_qat(model, (x,), backend="x86", **kw)
    return qat, time.perf_counter() - t0


def main():
    print(machine_line(), flush=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet18_shaped(num_classes=10).train()
    x = image_batches(1, batch=args.batch, res=args.res, seed=1)[0]
    y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(0))

    qc8, t_qc8 = qcompile_qat(model, x)
    qc4, t_qc4 = qcompile_qat(model, x, weights=qcompile.WeightSpec(bits=4), learn_scale=True)
    graph_only, _ = qcompile_qat(model, x)
    graph_only.disable_fake_quant().freeze_observers()
    ao, t_ao = torch_ao_qat(model, x)
    fns = {"float": make_step(copy.deepcopy(model).train(), x, y), "qc8": make_step(qc8, x, y),
           "qc4": make_step(qc4, x, y), "graph": make_step(graph_only, x, y), "ao": make_step(ao, x, y)}
    med = interleaved(fns, warmup=2, repeats=args.repeats)
    f = med["float"]
    rows = [
        ["float eager (baseline)", f"{f * 1e3:.0f}", "1.00x", "-", "-"],
        ["qcompile QAT graph, fake-quant and observers off (capture + conv-BN formulation)", f"{med['graph'] * 1e3:.0f}",
         f"{med['graph'] / f:.2f}x", "-", "-"],
        ["qcompile prepare_qat x86, w8/a8", f"{med['qc8'] * 1e3:.0f}", f"{med['qc8'] / f:.2f}x",
         f"{med['qc8'] / med['ao']:.2f}", f"{t_qc8:.1f}"],
        ["qcompile prepare_qat x86, w4/a8 LSQ", f"{med['qc4'] * 1e3:.0f}", f"{med['qc4'] / f:.2f}x",
         f"{med['qc4'] / med['ao']:.2f}", f"{t_qc4:.1f}"],
        ["torch.ao prepare_qat_fx (x86 default QAT qconfig)", f"{med['ao'] * 1e3:.0f}", f"{med['ao'] / f:.2f}x",
         "1.00", f"{t_ao:.1f}"],
    ]
    print(f"ResNet-18 shape (10 classes), training step = forward + backward + SGD, batch {args.batch}, "
          f"{args.res}x{args.res}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved "
          f"rounds (after 2 warm-up rounds)\n")
    print(table(rows, ["system", "step ms", "vs float (target <= 2x)", "vs torch.ao", "prepare s"]))
    n_fq = len(qc8.fake_quants())
    print(f"\nqcompile QAT graph: {n_fq} fake-quant modules "
          f"({sum(fq.weight for fq in qc8.fake_quants().values())} on weights)")


if __name__ == "__main__":
    main()
