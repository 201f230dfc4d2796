"""Bias correction (Nagel et al., "Data-Free Quantization", 2019; Finkelstein et al., 2019).

Rounding a weight ``W`` to ``Q`` shifts the layer's expected output by ``(Q - W) E[x]``: with few
bits the error of a channel's weights does not average out and the shift moves every later layer.
The correction subtracts it from the bias, so the quantized layer's mean output equals the float one.

* empirical (default): ``E[x]`` measured on calibration data. For a conv the mean input *map*
  ``[C, H, W]`` is kept and convolved with ``Q - W`` (zero padding included), so the corrected
  mean output is exact on that data, not only away from the borders.
* analytic: ``E[x]`` from the batch-norm statistics of the layer that produced ``x`` (mean ``beta``,
  std ``gamma``) through its ReLU / ReLU6, as a clipped normal (DFQ eq. 12), when no data is given:
  see :func:`clipped_normal_mean` and :func:`analytic_input_means`.

``Q`` is what convert will produce: the weight's ``WEIGHT_QPARAMS`` if a rounding pass (GPTQ,
learned rounding) fixed them, else the spec's observer on the weight. ``reference`` holds the float
weights the correction is measured against (the weights before rounding passes moved them).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

from qcompile import meta
from qcompile import annotation as A
from qcompile.ir import get_attr_value
from qcompile.observers import weight_qparams
from qcompile.ops import op_kind
from qcompile.qparams import dequantize, quantize
from qcompile.specs import QuantSpec

from .calibration_stats import collect
from .equalize import _bias, _set_bias



def quantized_layers(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, QuantSpec]]:
    """(layer, its float input value, weight spec) of every conv / linear whose weight convert quantizes."""
    observers = set(meta.OBSERVED.get(gm, {}))
    out = []
    for node in gm.graph.nodes:
        ann = A.get_annotation(node)
        if ann is None or op_kind(node) not in ("conv2d", "linear"):
            continue
        spec, w = ann.input_specs.get(1), node.args[1]
        if not isinstance(spec, QuantSpec) or spec.dynamic or not isinstance(w, fx.Node) or w.op != "get_attr":
            continue
        x = node.args[0]
        while x.op == "call_module" and x.target in observers:
            x = x.args[0]
        out.append((node, x, spec))
    return out


def rounded_weight(gm: fx.GraphModule, layer: fx.Node, spec: QuantSpec) -> torch.Tensor:
    """The dequantized weight convert will produce for ``layer``."""
    w_node = layer.args[1]
    w = get_attr_value(gm, w_node).detach().float()
    qp = meta.WEIGHT_QPARAMS.get(w_node) or weight_qparams(w, spec)
    return dequantize(quantize(w, qp), qp)


def output_shift(layer: fx.Node, delta: torch.Tensor, stats) -> torch.Tensor:
    """Mean output change per output channel caused by the weight change ``delta`` on inputs ``stats``."""
    if op_kind(layer) == "linear":
        return delta @ stats.mean.float()
    a = list(layer.args) + [None] * 7
    stride, padding, dilation = a[3] or (1, 1), a[4] or (0, 0), a[5] or (1, 1)
    groups = int(a[6] or 1)
    m = stats.mean_map
    if m is None:  # input size varied: channel means on a padding-free approximation
        m = stats.mean.float().view(-1, 1, 1).expand(-1, *delta.shape[2:])
        padding = (0, 0)
    out = F.conv2d(m.float()[None], delta, None, stride, padding, dilation, groups)
    return out.mean(dim=(0, 2, 3))


class BiasCorrection:
    """Empirical bias correction of every quantized conv / linear of a prepared graph.

    ``samples``: re-iterable ``(args, kwargs)``; ``reference``: ``{weight target: float weight}`` to
    measure against (default: the current weights). Returns ``{layer: max |shift| removed}``."""

    def __init__(self, reference: dict | None = None, min_shift: float = 0.0):
        self.reference, self.min_shift = reference or {}, min_shift

    def __call__(self, gm: fx.GraphModule, samples) -> dict:
        layers = quantized_layers(gm)
        linear_inputs = {x.name: -1 for layer, x, _ in layers if op_kind(layer) == "linear"}
        convs = {x.name for layer, x, _ in layers if op_kind(layer) != "linear"}
        stats = collect(gm, [x.name for _, x, _ in layers], samples,
                        {k: v for k, v in linear_inputs.items() if k not in convs})
        report = meta.BIAS_CORRECTION.setdefault(gm, {})
        for layer, x, spec in layers:
            w_node = layer.args[1]
            w = self.reference.get(w_node.target, get_attr_value(gm, w_node)).detach().float()
            delta = rounded_weight(gm, layer, spec) - w
            if op_kind(layer) == "linear" and stats[x.name].mean.numel() != delta.shape[1]:
                continue  # its input also feeds a conv, whose channels were measured: no linear mean here
            shift = output_shift(layer, delta, stats[x.name])
            if float(shift.abs().max()) <= self.min_shift:
                continue
            _set_bias(gm, layer, _bias(gm, layer, w.shape[0]) - shift)
            report[layer.name] = float(shift.abs().max())
        gm.recompile()
        return report


# -- analytic: expected inputs from batch-norm statistics -------------------------------------------
def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))


def clipped_normal_mean(mu: torch.Tensor, sigma: torch.Tensor, lo: float = 0.0, hi: float = math.inf) -> torch.Tensor:
    """``E[clamp(z, lo, hi)]`` for ``z ~ N(mu, sigma^2)`` per channel (ReLU: lo=0; ReLU6: hi=6)."""
    sigma = sigma.abs().clamp_min(1e-12)
    a = (lo - mu) / sigma
    inside_lo = mu * (1 - _cdf(a)) + sigma * _phi(a) + lo * _cdf(a)
    if math.isinf(hi):
        return inside_lo
    b = (hi - mu) / sigma
    return (lo * _cdf(a) + hi * (1 - _cdf(b)) + mu * (_cdf(b) - _cdf(a)) + sigma * (_phi(a) - _phi(b)))


def analytic_input_means(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{conv module name: E[input channel]}`` for convs fed directly by BatchNorm2d -> ReLU / ReLU6
    in an ``nn.Sequential`` (the data-free case of DFQ), from the BN's ``bias`` / ``weight``."""
    means = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Sequential):
            continue
        kids = list(mod.named_children())
        for i in range(len(kids) - 2):
            (_, bn), (_, act), (cname, conv) = kids[i], kids[i + 1], kids[i + 2]
            if isinstance(bn, torch.nn.BatchNorm2d) and isinstance(conv, torch.nn.Conv2d):
                hi = 6.0 if isinstance(act, torch.nn.ReLU6) else math.inf if isinstance(act, torch.nn.ReLU) else None
                if hi is not None:
                    key = f"{name}.{cname}" if name else cname
                    means[key] = clipped_normal_mean(bn.bias.detach().double(), bn.weight.detach().double(), 0.0, hi)
    return means
