"""Sections of bench/x86_kernels.py that measure error as well as time: the dynamic int8 linear (4) and the
int16 saturation of int8 conv kernels against an exact integer reference (3)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from _kernel_harness import CL, ENGINES, Harness, ms, out, prepack, q_act, q_weight, x86_conv_backend, zp


# ------------------------------------------------------------------ 4. dynamic linear
def _simulated_error(xf, wq, ws, b, yref, reduce_range: bool) -> float:
    """Relative error of an exact integer simulation (per-tensor affine u8 activations, no saturation)."""
    qmax = 127 if reduce_range else 255
    lo, hi = min(float(xf.min()), 0.0), max(float(xf.max()), 0.0)
    sx = (hi - lo) / qmax
    zx = int(round(-lo / sx))
    xd = (torch.clamp(torch.round(xf.double() / sx) + zx, 0, qmax) - zx) * sx
    ys = F.linear(xd, wq * ws.view(-1, 1), b.double())
    return float((ys - yref).norm() / yref.norm())


def _dynamic_variants(xf, w, qw, b, yref) -> tuple[dict, dict]:
    variants, err = {"fp32": lambda: F.linear(xf, w, b)}, {}
    for e in ENGINES:
        torch.backends.quantized.engine = e
        p = torch.ops.quantized.linear_prepack(qw, b)
        for rr in (False, True):
            def f(e=e, p=p, rr=rr):
                torch.backends.quantized.engine = e
                return torch.ops.quantized.linear_dynamic(xf, p, rr)
            variants[(e, rr)] = f
            y = f().double()
            err[(e, rr)] = float((y - yref).norm() / yref.norm())
    return variants, err


def section_dyn(h: Harness) -> None:
    out("### 4. `quantized.linear_dynamic(x_fp32, packed, reduce_range)` (fp32 in/out, int8 weights)\n")
    out("Input = LayerNorm-like signed activations with per-feature offsets (so the per-tensor u8 zero point sits "
        "mid-range). Weights per-channel symmetric int8 [-128,127], `quantized.linear_prepack(qw, bias)` once per "
        "engine. `speed-up` = fp32 time / int8 time (median of paired per-round ratios). `err` = relative L2 error "
        "vs float64 `F.linear`; `err sim` = same error for an exact integer simulation (per-tensor asymmetric u8 "
        "activations over 0..255, or 0..127 with reduce_range, no saturation), so `err` > `err sim` means the "
        "kernel lost accuracy on its own (int16 saturation).\n")
    out("| shape | fp32 ms | engine | reduce_range | int8 ms | speed-up | err | err sim |")
    out("|---|---|---|---|---|---|---|---|")
    for m, k, n in ((1, 384, 1536), (1024, 384, 1536)):
        g = torch.Generator().manual_seed(1)
        xf = torch.randn(m, k, generator=g) * 0.5 + 1.0 * torch.randn(1, k, generator=g)
        w = torch.randn(n, k, generator=g) / math.sqrt(k)
        b = torch.randn(n, generator=g) * 0.1
        qw, wq, ws = q_weight(w)
        yref = F.linear(xf.double(), w.double(), b.double())
        sim = {rr: _simulated_error(xf, wq, ws, b, yref, rr) for rr in (False, True)}
        variants, err = _dynamic_variants(xf, w, qw, b, yref)
        with torch.inference_mode():
            t = h.bench(variants, 1.0)
        for e in ENGINES:
            for rr in (False, True):
                out(f"| [{m},{k}]x[{n},{k}] | {t.f('fp32', ms)} | {e} | {rr} | {t.f((e, rr), ms)} | "
                    f"{t.rf('fp32', (e, rr))}x | {err[(e, rr)]:.2e} | {sim[rr]:.2e} |")
    h.noise_note()


# ------------------------------------------------------------------ 3. saturation / accuracy
SCHEMES = [("A8/W8", 255, -128, 127), ("A7/W8 (reduce_range)", 127, -128, 127), ("A8/W7", 255, -64, 63)]
_K1 = torch.tensor([1., 4., 6., 4., 1.]) / 16
K5 = _K1[:, None] * _K1[None, :]


def smooth(g, n, c, hw, relu, chan_mix=True):
    z = torch.randn(n, c, hw + 4, hw + 4, generator=g)
    z = F.conv2d(z, K5.expand(c, 1, 5, 5), groups=c)               # spatial smoothing
    if chan_mix:
        z = z + 0.5 * z.roll(1, 1) + 0.5 * z.roll(-1, 1)            # some cross-channel correlation
    z = z / z.std()
    gamma = torch.rand(c, generator=g) + 0.5                       # BN-like per-channel affine
    beta = torch.randn(c, generator=g) * 0.5
    z = z * gamma.view(1, c, 1, 1) + beta.view(1, c, 1, 1)
    return z.relu() if relu else z


def kaiming(g, co, ci, k):
    return torch.randn(co, ci, k, k, generator=g) * math.sqrt(2.0 / (ci * k * k))


def student(g, co, ci, k):
    z = torch.randn(co, ci, k, k, generator=g)
    chi2 = (torch.randn(3, co, ci, k, k, generator=g) ** 2).sum(0)
    t = z / torch.sqrt(chi2 / 3.0)                                 # Student-t, 3 dof (var 3)
    return t / math.sqrt(3.0) * math.sqrt(2.0 / (ci * k * k))


def image_like(g):
    z = torch.randn(1, 3, 232, 232, generator=g)
    for _ in range(3):                                             # strongly smooth, dense, signed
        z = F.conv2d(F.pad(z, (2, 2, 2, 2), mode="reflect"), K5.expand(3, 1, 5, 5), groups=3)
    z = z[..., 4:228, 4:228]
    return (z - z.mean()) / z.std()


def accuracy_cases() -> list:
    """(label, x, w, stride, pad, groups, ReLU input), drawn in a fixed order from one seeded generator."""
    g = torch.Generator().manual_seed(123)
    return [
        ("3x3 64->64 @56 N=2, ReLU-smooth x, kaiming W", smooth(g, 2, 64, 56, True), kaiming(g, 64, 64, 3),
         1, 1, 1, True),
        ("3x3 64->64 @56 N=2, ReLU-smooth x, Student-t3 W", smooth(g, 2, 64, 56, True), student(g, 64, 64, 3), 1, 1, 1,
         True),
        ("3x3 64->64 @56 N=2, signed-smooth x (no ReLU), kaiming W", smooth(g, 2, 64, 56, False), kaiming(g, 64, 64, 3),
         1, 1, 1, False),
        ("conv1 7x7 s2 3->64 @224, image-like signed x, kaiming W", image_like(g), kaiming(g, 64, 3, 7),
         2, 3, 1, False),
        ("dw 3x3 144 @56, ReLU-smooth x, kaiming W", smooth(g, 1, 144, 56, True, False), kaiming(g, 144, 1, 3),
         1, 1, 144, True),
        ("3x3 64->64 @56 N=2, dense uniform x (stress), kaiming W", torch.rand(2, 64, 56, 56, generator=g),
         kaiming(g, 64, 64, 3), 1, 1, 1, True),
    ]


def sqnr(ref, y):
    return 10 * math.log10(float((ref ** 2).sum()) / max(float(((y - ref) ** 2).sum()), 1e-30))


def _kernel_codes(qx, qw, wq, ws, xs, xz, conv, out_q) -> dict:
    """uint8 output codes of every engine's int8 conv and of oneDNN's fp32-output pointwise conv."""
    st, pad, grp, co = conv
    os_, oz = out_q
    res = {}
    for e in ENGINES:
        p = prepack(e, qw, None, st, pad, grp)
        torch.backends.quantized.engine = e
        res[e] = torch.ops.quantized.conv2d(qx, p, os_, oz).int_repr().double()
    u8 = qx.int_repr().contiguous(memory_format=CL)
    pwp = torch.ops.onednn.qconv_prepack(wq.to(torch.int8), ws.float(), xs, xz, [st] * 2, [pad] * 2, [1, 1], grp,
                                         list(u8.shape))
    yf32 = torch.ops.onednn.qconv2d_pointwise(u8, xs, xz, pwp, ws.float(), zp(co), None, [st] * 2, [pad] * 2, [1, 1],
                                              grp, 1.0, 0, torch.float32, "none", [], "").double()
    res["pw"] = torch.clamp(torch.round(yf32 / os_) + oz, 0, 255)
    return res


def _accuracy_row(label, xf, w, conv, relu_in, scheme, yf) -> str:
    st, pad, grp = conv
    sname, qmax, wmin, wmax = scheme
    qx, xs, xz = q_act(xf, qmax, relu=relu_in)
    qx = qx.contiguous(memory_format=CL)
    qw, wq, ws = q_weight(w, wmin, wmax)
    xd = (qx.int_repr().double() - xz) * xs
    yacc = F.conv2d(xd, wq * ws.view(-1, 1, 1, 1), None, st, pad, 1, grp)
    lo, hi = min(float(yacc.min()), 0.0), max(float(yacc.max()), 0.0)
    os_ = (hi - lo) / 255
    oz = int(min(255, max(0, round(-lo / os_))))
    qref = torch.clamp(torch.round(yacc / os_) + oz, 0, 255)
    res = _kernel_codes(qx, qw, wq, ws, xs, xz, (st, pad, grp, w.shape[0]), (os_, oz))
    frac = {k: float(((v - qref).abs() > 1).double().mean()) * 100 for k, v in res.items()}
    mx = max(int((v - qref).abs().max()) for v in res.values())
    worst = min(sqnr(yf, (v - oz) * os_) for v in res.values())
    return (f"| {label} | {sname} | {frac['x86']:.3f}% [{x86_conv_backend(grp)}] | {frac['fbgemm']:.3f}% | "
            f"{frac['onednn']:.3f}% | {frac['pw']:.3f}% | {mx} | {sqnr(yf, yacc):.2f} | "
            f"{sqnr(yf, (qref - oz) * os_):.2f} | {worst:.2f} |")


def section_acc(h: Harness) -> None:
    out("### 3. Saturation / accuracy of int8 conv vs exact integer reference\n")
    out("Reference = float64 conv of the *dequantized* int tensors, requantized with the kernel's output scale/zp "
        "(round-half-even, clamp 0..255; output qparams = min/max of that reference). `>1 step` = % of outputs "
        "whose uint8 code differs from the reference by more than 1 (x86 column says which kernel the x86 engine "
        "picked on this host). `pw-f32` = `onednn.qconv2d_pointwise(..., output_dtype=torch.float32)` requantized "
        "the same way. `max` = largest code difference over all engines. SQNR (dB) vs fp32 conv of the float "
        "inputs/weights: `acc` = exact int accumulator (quantization loss of inputs+weights only), `sim u8` = "
        "reference u8 output, `kernel` = worst engine's u8 output. Weights per-output-channel symmetric; "
        "activations per-tensor min/max (`ReLU` inputs: zp=0; signed inputs: asymmetric, zp mid-range).\n")
    out("| case | scheme | x86 | fbgemm | onednn | pw-f32 | max | SQNR acc | SQNR sim u8 | SQNR kernel |")
    out("|---|---|---|---|---|---|---|---|---|---|")
    for label, xf, w, st, pad, grp, relu_in in accuracy_cases():
        yf = F.conv2d(xf.double(), w.double(), None, st, pad, 1, grp)
        for scheme in SCHEMES:
            out(_accuracy_row(label, xf, w, (st, pad, grp), relu_in, scheme, yf))
    out()
