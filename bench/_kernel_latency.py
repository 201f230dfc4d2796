"""Latency sections of bench/x86_kernels.py: int8 conv (1, 1b), static linear (1c), elementwise (2) and
dynamic linear (4). Each section prints one markdown table; ``h`` is the run's :class:`Harness`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from _kernel_harness import CL, ENGINES, Harness, ms, out, prepack, q_act, q_weight, us, x86_conv_backend, zp

RESNET = [  # name, N, Cin, Cout, H, k, stride, pad, groups
    ("conv1 7x7 s2 3->64 @224", 4, 3, 64, 224, 7, 2, 3, 1),
    ("3x3 64->64 @56", 4, 64, 64, 56, 3, 1, 1, 1),
    ("3x3 s2 64->128 @56", 4, 64, 128, 56, 3, 2, 1, 1),
    ("1x1 s2 64->128 @56 (ds)", 4, 64, 128, 56, 1, 2, 0, 1),
    ("3x3 128->128 @28", 4, 128, 128, 28, 3, 1, 1, 1),
    ("1x1 s2 128->256 @28 (ds)", 4, 128, 256, 28, 1, 2, 0, 1),
    ("3x3 256->256 @14", 4, 256, 256, 14, 3, 1, 1, 1),
    ("1x1 s2 256->512 @14 (ds)", 4, 256, 512, 14, 1, 2, 0, 1),
    ("3x3 512->512 @7", 4, 512, 512, 7, 3, 1, 1, 1),
]
MOBILENET = [
    ("dw 3x3 32 @112", 1, 32, 32, 112, 3, 1, 1, 32),
    ("dw 3x3 s2 96 @112", 1, 96, 96, 112, 3, 2, 1, 96),
    ("dw 3x3 144 @56", 1, 144, 144, 56, 3, 1, 1, 144),
    ("dw 3x3 384 @14", 1, 384, 384, 14, 3, 1, 1, 384),
    ("dw 3x3 960 @7", 1, 960, 960, 7, 3, 1, 1, 960),
    ("pw 1x1 16->96 @112", 1, 16, 96, 112, 1, 1, 0, 1),
    ("pw 1x1 144->24 @56", 1, 144, 24, 56, 1, 1, 0, 1),
    ("pw 1x1 64->384 @14", 1, 64, 384, 14, 1, 1, 0, 1),
    ("pw 1x1 960->160 @7", 1, 960, 160, 7, 1, 1, 0, 1),
    ("pw 1x1 320->1280 @7", 1, 320, 1280, 7, 1, 1, 0, 1),
]
FORMAT_SHAPES = ("3x3 64->64 @56", "dw 3x3 144 @56", "dw 3x3 32 @112")


def _memory_format(y) -> str:
    return "channels_last" if y.is_contiguous(memory_format=CL) else ("NCHW" if y.is_contiguous() else "strided")


# ------------------------------------------------------------------ 1. conv
class _ConvCase:
    """One conv shape: float and quantized operands, output parameters, packed weights per engine."""

    def __init__(self, shape):
        name, n, ci, co, hw, k, st, pad, g = shape
        self.name, self.co, self.st, self.pad, self.g = name, co, st, pad, g
        self.xf = torch.randn(n, ci, hw, hw).relu_()
        self.w = torch.randn(co, ci // g, k, k) * math.sqrt(2.0 / (ci // g * k * k))
        self.b = torch.randn(co) * 0.1
        qx_cl, self.xs, self.xz = q_act(self.xf.contiguous(memory_format=CL))
        self.qx_cl = qx_cl.contiguous(memory_format=CL)
        self.qx_nchw = self.qx_cl.contiguous()
        qw, wq, ws = q_weight(self.w)
        with torch.no_grad():
            yref = F.conv2d(self.xf, self.w, self.b, st, pad, 1, g)
        self.os = float(yref.max() - yref.min()) / 255
        self.oz = int(round(-float(yref.min()) / self.os))
        self.packs = {e: prepack(e, qw, self.b, st, pad, g) for e in ENGINES}
        self.u8 = self.qx_cl.int_repr().contiguous(memory_format=CL)
        self.pw = torch.ops.onednn.qconv_prepack(wq.to(torch.int8), ws.float(), self.xs, self.xz, [st] * 2, [pad] * 2,
                                                 [1, 1], g, list(self.u8.shape))
        self.wsf = ws.float()

    def quantized(self, e, x, relu=False):
        op = torch.ops.quantized.conv2d_relu if relu else torch.ops.quantized.conv2d
        p = self.packs[e]

        def f():
            torch.backends.quantized.engine = e
            return op(x, p, self.os, self.oz)
        return f

    def pointwise(self, x, out_zp, attr):
        return torch.ops.onednn.qconv2d_pointwise(x, self.xs, self.xz, self.pw, self.wsf, zp(self.co), self.b,
                                                  [self.st] * 2, [self.pad] * 2, [1, 1], self.g, self.os, out_zp,
                                                  None, attr, [], "")

    def variants(self) -> dict:
        xcl, wcl = self.xf.contiguous(memory_format=CL), self.w.contiguous(memory_format=CL)
        q = self.quantized
        return {
            "fp32_cl": lambda: F.conv2d(xcl, wcl, self.b, self.st, self.pad, 1, self.g),
            "fp32_nchw": lambda: F.conv2d(self.xf, self.w, self.b, self.st, self.pad, 1, self.g),
            "fbgemm": q("fbgemm", self.qx_cl), "fbgemm_relu": q("fbgemm", self.qx_cl, True),
            "onednn": q("onednn", self.qx_cl), "onednn_relu": q("onednn", self.qx_cl, True),
            "x86": q("x86", self.qx_cl),
            "pw": lambda: self.pointwise(self.u8, 0, "relu"),
            "fbgemm_nchw": q("fbgemm", self.qx_nchw), "onednn_nchw": q("onednn", self.qx_nchw),
        }

    def formats(self) -> list:
        """(shape, op, input layout, output layout) of the int8 convs on both input layouts."""
        rows = []
        for e in ENGINES:
            for xin, lab in ((self.qx_cl, "channels_last"), (self.qx_nchw, "NCHW")):
                torch.backends.quantized.engine = e
                y = torch.ops.quantized.conv2d(xin, self.packs[e], self.os, self.oz)
                rows.append((self.name, f"quantized.conv2d [{e}]", lab, _memory_format(y)))
        for xin, lab in ((self.u8, "channels_last"), (self.u8.contiguous(), "NCHW")):
            y = self.pointwise(xin, self.oz, "none")
            rows.append((self.name, "onednn.qconv2d_pointwise", lab, _memory_format(y)))
        return rows


def _conv_table(h: Harness, title: str, shapes, budget: float, fmt_rows: list) -> None:
    out(f"### 1. Conv latency — {title}\n")
    out("fp32 = aten conv2d (oneDNN) with channels_last input+weight; every other cell is "
        "median time in ms and, in brackets, **speed-up vs fp32 channels_last** (>1 = faster; median of per-round "
        "paired ratios). int8 inputs are channels_last quint8 unless marked NCHW; `+relu` = `quantized.conv2d_relu`; "
        "`pw` = `onednn.qconv2d_pointwise(..., attr='relu')` on a plain uint8 tensor. "
        "'NCHW-in' columns are the time ratio of a contiguous-NCHW quint8 input vs channels_last (>1 = slower).\n")
    out("| shape | fp32 CL ms | fp32 NCHW | fbgemm | fbgemm +relu | onednn | onednn +relu | x86 (ran) | pw relu "
        "| fbgemm NCHW-in | onednn NCHW-in |")
    out("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        case = _ConvCase(shape)
        with torch.inference_mode():
            t = h.bench(case.variants(), budget)
        c = lambda n: f"{t.f(n, ms)} ({t.rf('fp32_cl', n)}x)"  # noqa: E731
        out(f"| {case.name} | {t.f('fp32_cl', ms)} | {c('fp32_nchw')} | {c('fbgemm')} | {c('fbgemm_relu')} | "
            f"{c('onednn')} | {c('onednn_relu')} | {c('x86')} [{x86_conv_backend(case.g)}] | {c('pw')} | "
            f"{t.rf('fbgemm_nchw', 'fbgemm')} | {t.rf('onednn_nchw', 'onednn')} |")
        if case.name in FORMAT_SHAPES:
            fmt_rows += case.formats()
    h.noise_note()


def section_conv(h: Harness) -> None:
    fmt_rows: list = []
    for title, shapes, budget in (("ResNet-18, batch 4", RESNET, 1.2), ("MobileNetV2, batch 1", MOBILENET, 0.5)):
        _conv_table(h, title, shapes, budget, fmt_rows)
    out("### 1b. Output memory format of int8 conv\n")
    out("| shape | op [engine] | output for channels_last input | output for NCHW input |")
    out("|---|---|---|---|")
    merged = {}
    for shp, op, lab, ofmt in fmt_rows:
        merged.setdefault((shp, op), {})[lab] = ofmt
    for (shp, op), d in merged.items():
        out(f"| {shp} | {op} | {d.get('channels_last')} | {d.get('NCHW')} |")
    out()


# ------------------------------------------------------------------ 1c. static linear
def _linear_variants(m, k, n) -> dict:
    xf = torch.randn(m, k).relu_()
    w = torch.randn(n, k) / math.sqrt(k)
    b = torch.randn(n) * 0.1
    qx, xs, xz = q_act(xf)
    qw, wq, ws = q_weight(w)
    yref = F.linear(xf, w, b)
    os_ = float(yref.max() - yref.min()) / 255
    oz = int(round(-float(yref.min()) / os_))
    packs = {}
    for e in ENGINES:
        torch.backends.quantized.engine = e
        packs[e] = torch.ops.quantized.linear_prepack(qw, b)
    plw = torch.ops.onednn.qlinear_prepack(wq.to(torch.int8), [m, k])
    u8, wsf = qx.int_repr(), ws.float()

    def mk(e):
        p = packs[e]

        def f():
            torch.backends.quantized.engine = e
            return torch.ops.quantized.linear(qx, p, os_, oz)
        return f
    return {"fp32": lambda: F.linear(xf, w, b), **{e: mk(e) for e in ENGINES},
            "pw": lambda: torch.ops.onednn.qlinear_pointwise(u8, xs, xz, plw, wsf, zp(n), b, os_, oz, None, "none",
                                                             [], "")}


def section_linear(h: Harness) -> None:
    out("### 1c. Linear (static int8) latency\n")
    out("Cells: median ms (speed-up vs fp32 `F.linear`). int8 = `quantized.linear(qx, packed, out_scale, out_zp)` "
        "per engine; `qlinear_pw` = `onednn.qlinear_pointwise` on plain uint8 with `onednn.qlinear_prepack`.\n")
    out("| shape (x · Wᵀ) | fp32 ms | fbgemm | x86 | onednn | qlinear_pw |")
    out("|---|---|---|---|---|---|")
    for m, k, n in ((4, 512, 1000), (8 * 128, 384, 1536)):
        variants = _linear_variants(m, k, n)
        with torch.inference_mode():
            t = h.bench(variants, 1.0)
        c = lambda v: f"{t.f(v, ms)} ({t.rf('fp32', v)}x)"  # noqa: E731
        out(f"| [{m},{k}]x[{n},{k}] | {t.f('fp32', ms)} | {c('fbgemm')} | {c('x86')} | {c('onednn')} | {c('pw')} |")
    h.noise_note()


# ------------------------------------------------------------------ 2. elementwise
def _elementwise_entries(lay, a_n, b_n, r_n) -> list:
    cv = (lambda t: t.contiguous(memory_format=CL)) if lay == "channels_last" else (lambda t: t.contiguous())
    a, bb, r = cv(a_n), cv(b_n), cv(r_n)
    qa, sa, za = q_act(a, relu=False)
    qb, sb, zb = q_act(bb, relu=False)
    qr, sr, zr = q_act(r)
    qa, qb, qr = cv(qa), cv(qb), cv(qr)
    so, zo = (sa + sb), 128
    ents = [
        ("quantized.add", lambda: a + bb, lambda: torch.ops.quantized.add(qa, qb, so, zo)),
        ("quantized.add_relu", lambda: torch.add(a, bb).relu_(), lambda: torch.ops.quantized.add_relu(qa, qb, so, 0)),
        ("quantized.mul", lambda: a * bb, lambda: torch.ops.quantized.mul(qa, qb, sa * sb * 8, 128)),
        ("quantized.hardswish", lambda: F.hardswish(a), lambda: torch.ops.quantized.hardswish(qa, sa, za)),
        ("sigmoid (torch.sigmoid on quint8)", lambda: torch.sigmoid(a), lambda: torch.sigmoid(qa)),
        ("max_pool2d 3x3 s2 p1", lambda: F.max_pool2d(r, 3, 2, 1), lambda: F.max_pool2d(qr, 3, 2, 1)),
        ("adaptive_avg_pool2d(1)", lambda: F.adaptive_avg_pool2d(r, 1), lambda: F.adaptive_avg_pool2d(qr, 1)),
        ("quantize_per_tensor f32->quint8", lambda: a.clone(),
         lambda: torch.quantize_per_tensor(a, sa, za, torch.quint8)),
        (".dequantize() quint8->f32", lambda: a.clone(), lambda: qa.dequantize()),
    ]
    if lay == "NCHW":
        ents.append(("NCHW->channels_last `.contiguous(memory_format=CL)`", lambda: a.contiguous(memory_format=CL),
                     lambda: qa.contiguous(memory_format=CL)))
    return ents


def section_elem(h: Harness) -> None:
    out("### 2. Elementwise / pooling / (de)quantize on [4,64,56,56]\n")
    out("Median µs; ratio = int8 time / fp32 time (<1 = int8 faster; median of per-round paired ratios). Engine set "
        "to x86 (these ops do not depend on the engine). fp32 reference for quantize/dequantize/format-conversion is "
        "a same-shape fp32 copy (`clone`), i.e. one memory pass.\n")
    out("| op | layout | fp32 µs | int8 µs | int8/fp32 |")
    out("|---|---|---|---|---|")
    torch.backends.quantized.engine = "x86"
    shape = (4, 64, 56, 56)
    a_n, b_n = torch.randn(shape), torch.randn(shape)
    r_n = a_n.relu()
    rows = []
    for lay in ("channels_last", "NCHW"):
        for name, ff, fq in _elementwise_entries(lay, a_n, b_n, r_n):
            with torch.inference_mode():
                t = h.bench({"f": ff, "q": fq}, 0.35)
            rows.append((name, lay, t.f("f", us), t.f("q", us), t.rf("q", "f")))
    rows.sort(key=lambda r: r[0])
    for name, lay, tf, tq, rq in rows:
        out(f"| {name} | {lay} | {tf} | {tq} | {rq} |")
    h.noise_note()
    q = torch.quantize_per_tensor(r_n, 0.05, 0, torch.quint8)  # output format of pooling on NCHW vs CL
    for lay, qq in (("NCHW", q), ("channels_last", q.contiguous(memory_format=CL))):
        y = F.max_pool2d(qq, 3, 2, 1)
        out(f"- quint8 max_pool2d on {lay} input -> output channels_last={y.is_contiguous(memory_format=CL)}")
    out()
