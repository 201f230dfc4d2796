"""ONNX backend, mode="dynamic" and mode="weight_only" on real MiniLM (all-MiniLM-L6-v2): ORT latency, file size,
sentence-embedding cosine vs the float PyTorch model.

    python bench/bench_onnx_modes.py [--repeats 15] [--threads N] [--seq 128]

Every system is compiled by qcompile's ONNX backend from the same captured graph (the float row excludes every
module, so it is the same ONNX graph with fp32 weights). Latency: median of interleaved ``session.run`` calls at
batch 1 and 8 (dynamic batch, one file per system); cosine: min / mean over zoo.SENTENCES at ``--seq`` tokens.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved, machine_line, table  # noqa: E402

import qcompile  # noqa: E402
from qcompile import WeightSpec  # noqa: E402
from _fixtures import zoo  # noqa: E402

SENTENCES, embed, load_minilm = zoo.SENTENCES, zoo.embed, zoo.load_minilm

warnings.filterwarnings("ignore")

SYSTEMS = {
    "float (fp32 MatMul)": dict(mode="weight_only", exclude=[".*"]),
    "dynamic int8 (DynamicQuantizeMatMul)": dict(mode="dynamic"),
    "weight-only int8 (MatMulNBits 8-bit, accuracy_level 4)": dict(mode="weight_only"),
    "weight-only int4 g128 (MatMulNBits, fp32 activations)": dict(
        mode="weight_only", weights=WeightSpec(bits=4, group_size=128)),
    "weight-only int4 g128 (MatMulNBits, accuracy_level 4)": dict(
        mode="weight_only", weights=WeightSpec(bits=4, group_size=128), backend_options={"accuracy_level": 4}),
    "weight-only nf4 g64 (MatMulBnb4)": dict(mode="weight_only", weights=WeightSpec(dtype="nf4")),
}


def linear_stack(repeats: int, threads):
    """Where MatMulNBits pays: few rows (token-at-a-time decoding) through big weights. 4 x Linear(2048, 2048)."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(4)]).eval()
    x = torch.randn(2, 2048)
    systems = {"float": dict(mode="weight_only", exclude=[".*"]), "dynamic int8": dict(mode="dynamic"),
               "int8 MatMulNBits (acc 4)": dict(mode="weight_only"),
               "int4 g128 MatMulNBits (fp32)": dict(mode="weight_only", weights=WeightSpec(bits=4, group_size=128)),
               "int4 g128 MatMulNBits (acc 4)": dict(mode="weight_only", weights=WeightSpec(bits=4, group_size=128),
                                                     backend_options={"accuracy_level": 4})}
    arts = {}
    for name, kw in systems.items():
        kw = dict(kw)
        opts = dict(kw.pop("backend_options", {}), threads=threads)
        arts[name] = qcompile.compile(m, (x,), backend="onnx", verify=False, backend_options=opts, **kw)
    rows, lat = [], {}
    for n_rows in (1, 64):
        feed = torch.randn(n_rows, 2048).numpy()
        lat[n_rows] = interleaved({k: (lambda a=a, f=feed: a.lowered.session.run(None, {a.lowered.emitted.inputs[0]: f}))
                                   for k, a in arts.items()}, repeats=repeats)
    for name, art in arts.items():
        rows.append([name, f"{lat[1][name] * 1e3:.2f}", f"{lat[64][name] * 1e3:.2f}",
                     f"{lat[1]['float'] / lat[1][name]:.2f}x", f"{lat[64]['float'] / lat[64][name]:.2f}x",
                     f"{art.lowered.model.ByteSize() / 1e6:.1f}"])
    print("\n4 x Linear(2048, 2048), rows per call 1 / 64\n")
    print(table(rows, ["system", "1 row ms", "64 rows ms", "speed-up 1", "speed-up 64", "file MB"]))


def main():
    print(machine_line(), flush=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()

    model, tok = load_minilm()
    enc = lambda s: tok(list(s), padding="max_length", truncation=True, max_length=args.seq,  # noqa: E731
                        return_tensors="pt")
    ex = enc(SENTENCES[:4])  # a batch > 1: torch.export specializes a batch of 1
    ref = embed(model, tok, SENTENCES, max_length=args.seq)
    feeds = {b: {"input_ids": enc(SENTENCES[:b])["input_ids"].numpy(),
                 "attention_mask": enc(SENTENCES[:b])["attention_mask"].numpy()} for b in (1, 8)}

    arts, rows = {}, []
    for name, kw in SYSTEMS.items():
        kw = dict(kw)
        opts = dict(kw.pop("backend_options", {}), threads=args.threads)
        art = qcompile.compile(model, (ex["input_ids"], ex["attention_mask"]), backend="onnx", verify=False,
                               backend_options=opts, **kw)
        cos = (embed(art, tok, SENTENCES, max_length=args.seq) * ref).sum(-1)
        arts[name] = (art, cos)
        print(f"compiled {name}: min cosine {cos.min():.4f}", flush=True)

    float_bytes = arts["float (fp32 MatMul)"][0].lowered.model.ByteSize()
    lat = {}
    for b in (1, 8):
        fns = {}
        for name, (art, _) in arts.items():
            sess, emitted = art.lowered.session, art.lowered.emitted
            f = {n: feeds[b][k] for n, k in zip(emitted.inputs, ("input_ids", "attention_mask")) if n}
            fns[name] = (lambda s=sess, f=f: s.run(None, f))
        lat[b] = interleaved(fns, repeats=args.repeats)
    for name, (art, cos) in arts.items():
        size = art.lowered.model.ByteSize()
        rows.append([name, f"{lat[1][name] * 1e3:.1f}", f"{lat[8][name] * 1e3:.1f}",
                     f"{lat[1]['float (fp32 MatMul)'] / lat[1][name]:.2f}x",
                     f"{lat[8]['float (fp32 MatMul)'] / lat[8][name]:.2f}x",
                     f"{size / 1e6:.1f}", f"{size / float_bytes:.3f}",
                     f"{cos.min():.4f} / {cos.mean():.4f}"])
    print(f"\nMiniLM (all-MiniLM-L6-v2), seq {args.seq}, {arts['float (fp32 MatMul)'][0].backend.runtime_name()}, "
          f"threads={args.threads or 'ORT default'}, median of {args.repeats} interleaved runs\n")
    print(table(rows, ["system", "batch 1 ms", "batch 8 ms", "speed-up b1", "speed-up b8", "file MB",
                       "file vs float", "min / mean cosine"]))
    linears = [r for r in arts["dynamic int8 (DynamicQuantizeMatMul)"][0].report.rows if r.op == "linear"]
    print(f"\ndynamic: {len(linears)} linears on {sorted({r.kernel.split(' (')[0] for r in linears})}")
    del arts
    linear_stack(args.repeats, args.threads)


if __name__ == "__main__":
    main()
