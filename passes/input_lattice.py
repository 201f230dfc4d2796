"""Exact 8-bit image inputs: the model input's per-channel pixel lattice mapped onto the integers 0..255.

An image pipeline hands a model 8-bit pixels, each channel normalized by its own mean and std, so channel
``c`` holds values ``low_c + k * step_c`` for integers ``k`` in 0..255. One per-tensor 8-bit grid cannot hold
three lattices with different steps and offsets: rounding the input onto it adds up to half a step of noise
to every pixel, and image networks are sensitive to exactly that (EfficientNet-Lite2 with real weights: the
input's rounding alone costs 19.0 dB of logit SQNR, more than any layer's weights; docs/accuracy.md).

When every calibration sample's single 4-D input lies on such a lattice and feeds one conv (through at most
a zero pad), :class:`AlignInputLattice` (on the captured graph) inserts ``x' = x / step_c + shift_c`` --
the lattice onto 256 consecutive integers, centred on the data (see :meth:`Lattice.center`) -- after the
pad and folds the inverse into the conv:
``W'[:, c] = W[:, c] * step_c``, ``b' = b - sum(W' * shift)``. The float graph computes the same function
(the pad still pads ``x`` with zeros). :class:`MarkExactInput` (after annotation) keeps the pad and the
multiply-add float and gives the conv's input the ``unit_scale`` observer: scale 1 and an integer zero
point, so every pixel is quantized exactly. (Only the pad's zeros are not pixel values: a border pixel of
the padded input is off by up to half a level.) The cost is one multiply-add per input element in float.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import fx

from qcompile import annotation as A
from qcompile import meta
from qcompile.ir import add_constant, constant_pad_value, fill_fake_val, get_attr_value, replace_weight_bias
from qcompile.specs import QuantSpec

from .infra import Pass, PassResult

aten = torch.ops.aten
MAX_CHANNELS = 16
MAX_SAMPLES = 32         # calibration samples read to find the lattice
MIN_LEVELS = 32          # fewer distinct values than this: not worth calling a lattice
LEVELS = 256
TOL = 0.02               # |k - round(k)| allowed (float32 arithmetic of the normalization)
REASON = ("exact 8-bit input: maps each channel's pixel lattice onto the integers 0..255 so the first conv's "
          "int8 input is exact (one float multiply-add per input element)")


@dataclass(frozen=True)
class Lattice:
    """Channel ``c`` of the input holds ``low[c] + k * step[c]``, ``k`` in ``0..levels[c] - 1``."""

    step: tuple
    low: tuple
    levels: tuple
    mean: tuple = ()  # mean level of each channel on the calibration samples

    def center(self) -> int:
        """The integer subtracted from every channel's levels so the int8 input is centred on its data: the
        int8 conv then reads ``q - zero_point`` near 0, and its weights' rounding error times the input's
        mean does not become an output offset (the levels' mean is ~120 for photographs)."""
        if not self.mean:
            return 0
        return int(round(sum((LEVELS - n) // 2 + m for n, m in zip(self.levels, self.mean)) / len(self.levels)))

    def shift(self) -> list[float]:
        """Offsets putting each channel's levels in the middle of 0..255 (its lowest at 0 when it spans 256),
        minus :meth:`center`."""
        c = self.center()
        return [(LEVELS - n) // 2 - lo / s - c for s, lo, n in zip(self.step, self.low, self.levels)]

    def describe(self) -> dict:
        return {"channels": len(self.step), "levels": list(self.levels), "center": self.center(),
                "step": [round(s, 7) for s in self.step], "low": [round(lo, 6) for lo in self.low]}


def _channel(v: torch.Tensor) -> tuple[float, float, int, float] | None:
    u = torch.unique(v.to(torch.float64))
    if u.numel() < MIN_LEVELS or u.numel() > LEVELS:
        return None
    span = float(u[-1] - u[0])
    n = round(span / float(u.diff().min()))
    if n + 1 > LEVELS or (n + 1) > 2 * u.numel():  # most levels must be seen: a coarser lattice is a guess
        return None
    step = span / n
    k = (u - u[0]) / step
    if float((k - k.round()).abs().max()) > TOL:
        return None
    return step, float(u[0]), n + 1, float((v.to(torch.float64).mean() - u[0]) / step)


def detect(samples: list[torch.Tensor], axis: int = 1) -> tuple[Lattice | None, str]:
    """(the lattice of ``samples`` along ``axis``, or None and why not)."""
    if not samples or any(not isinstance(s, torch.Tensor) or not s.is_floating_point() or s.dim() != 4 for s in samples):
        return None, "the model does not take one 4-D float tensor"
    c = samples[0].shape[axis]
    if c > MAX_CHANNELS or any(s.shape[axis] != c for s in samples):
        return None, f"the input has {c} channels (an image has at most {MAX_CHANNELS})"
    flat = torch.cat([s.detach().movedim(axis, 0).reshape(c, -1) for s in samples], dim=1)
    found = []
    for i in range(c):
        r = _channel(flat[i])
        if r is None:
            return None, f"channel {i} of the input is not on a lattice of <= {LEVELS} evenly spaced values"
        found.append(r)
    lat = Lattice(*(tuple(x) for x in zip(*found)))
    return lat, ""


def _single_placeholder(gm: fx.GraphModule) -> fx.Node | None:
    tensors = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    return tensors[0] if len(tensors) == 1 else None


def _is_zero_pad(node: fx.Node) -> bool:
    return constant_pad_value(node) == 0.0


def _data_users(node: fx.Node) -> list[fx.Node]:
    """Users reading ``node``'s values (not its shape: a dynamic batch size adds ``sym_size`` users)."""
    return [u for u in node.users if u.target not in (aten.sym_size.int, aten.sym_size.default)]


def _conv_chain(x: fx.Node) -> tuple[fx.Node | None, fx.Node | None, str]:
    """(zero pad or None, conv) when ``x`` feeds exactly one conv2d, through at most one zero pad."""
    users = _data_users(x)
    pad = users[0] if len(users) == 1 and _is_zero_pad(users[0]) else None
    src = pad if pad is not None else x
    users = _data_users(src)
    if len(users) != 1 or users[0].target != aten.conv2d.default or users[0].args[0] is not src:
        return None, None, "the model input does not feed exactly one conv2d"
    conv = users[0]
    groups = conv.args[6] if len(conv.args) > 6 else conv.kwargs.get("groups", 1)
    w = conv.args[1]
    if groups != 1 or not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None, None, "the first conv is grouped or its weight is not a constant"
    b = conv.args[2] if len(conv.args) > 2 else None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None, None, "the first conv's bias is not a constant"
    return pad, conv, ""


class AlignInputLattice(Pass):
    """On the captured graph: ``x -> [pad] -> conv`` becomes ``x -> pad -> x / step + shift -> conv(W', b')``."""

    def __init__(self, lattice: Lattice | None, why: str = ""):
        self.lattice, self.why = lattice, why

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.lattice is None:
            meta.EXACT_INPUT.set(gm, {"skipped": self.why})
            return PassResult(gm, False)
        x = _single_placeholder(gm)
        pad, conv, why = _conv_chain(x) if x is not None else (None, None, "the model has more than one input")
        lat = self.lattice
        shift = lat.shift()
        if conv is None:
            meta.EXACT_INPUT.set(gm, {"skipped": why})
            return PassResult(gm, False)
        c0 = lat.center()
        if any(not -0.5 - c0 <= t <= LEVELS - 0.5 - c0 for t in shift):  # a zero pad must land in the window
            meta.EXACT_INPUT.set(gm, {"skipped": "0.0 lies outside the input's 256-level window (the pad's zeros "
                                                 "would clip)"})
            return PassResult(gm, False)
        c = len(lat.step)
        w = get_attr_value(gm, conv.args[1]).detach()
        if w.shape[1] != c:
            meta.EXACT_INPUT.set(gm, {"skipped": f"the first conv reads {w.shape[1]} channels, the input has {c}"})
            return PassResult(gm, False)
        step = torch.tensor(lat.step, dtype=torch.float64).view(1, c, 1, 1)
        t = torch.tensor(shift, dtype=torch.float64).view(1, c, 1, 1)
        w2 = (w.to(torch.float64) * step)
        b0 = conv.args[2] if len(conv.args) > 2 else None
        b = get_attr_value(gm, b0).detach().to(torch.float64) if b0 is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        b2 = b - (w2 * t).sum(dim=(1, 2, 3))
        src = pad if pad is not None else x
        padding = conv.args[4] if len(conv.args) > 4 else conv.kwargs.get("padding", [0, 0])
        padding = [padding] * 2 if isinstance(padding, int) else list(padding)
        if any(padding):  # the conv's own zero padding becomes an explicit float pad of x (zeros in x, not x')
            with gm.graph.inserting_after(src):
                src = gm.graph.call_function(aten.constant_pad_nd.default,
                                             (src, [padding[1], padding[1], padding[0], padding[0]], 0.0))
            args = list(conv.args) + [None] * (5 - len(conv.args))
            args[4] = [0, 0]
            conv.args = tuple(args)
            pad = src
        inv = add_constant(gm, "exact_input_inv_step", (1.0 / step).to(torch.float32), conv)
        off = add_constant(gm, "exact_input_shift", t.to(torch.float32), conv)
        with gm.graph.inserting_before(conv):
            mul = gm.graph.call_function(aten.mul.Tensor, (src, inv))
            add = gm.graph.call_function(aten.add.Tensor, (mul, off))
        conv.update_arg(0, add)
        replace_weight_bias(gm, conv, w2.to(w.dtype), b2.to(w.dtype), "exact_input")
        for n in (mul, add) + ((pad,) if pad is not None and pad is not x else ()):
            n.meta.update({k: conv.meta[k] for k in ("nn_module_stack", "stack_trace") if k in conv.meta})
        for n in (pad, mul, add):
            if n is not None:
                fill_fake_val(n, gm)
        meta.EXACT_INPUT.set(gm, {**lat.describe(), "input": x.name})
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)


def _aligned_nodes(gm: fx.GraphModule) -> tuple[list[fx.Node], fx.Node | None]:
    """([pad?, mul, add], the conv) inserted by AlignInputLattice, found by the shift constant's name."""
    for n in gm.graph.nodes:
        if n.target == aten.add.Tensor and len(n.args) == 2 and isinstance(n.args[1], fx.Node) and \
                n.args[1].op == "get_attr" and str(n.args[1].target).startswith("exact_input_shift"):
            mul = n.args[0]
            src = mul.args[0] if isinstance(mul, fx.Node) and mul.args else None
            pad = src if isinstance(src, fx.Node) and src.op == "call_function" and _is_zero_pad(src) else None
            users = list(n.users)
            return [m for m in (pad, mul, n) if m is not None], users[0] if len(users) == 1 else None
    return [], None


class MarkExactInput(Pass):
    """After annotation: the pad and the multiply-add run in float, the conv's input gets ``unit_scale``."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        info = meta.EXACT_INPUT.get(gm)
        if not info or "skipped" in info:
            return PassResult(gm, False)
        nodes, conv = _aligned_nodes(gm)
        ann = A.get_annotation(conv) if conv is not None else None
        if ann is None or ann.status != A.INT8 or not isinstance(ann.input_specs.get(0), QuantSpec) or \
                ann.input_specs[0].granularity != "per_tensor":
            info = {**info, "skipped": "the first conv does not run in int8 with a per-tensor input"}
            meta.EXACT_INPUT.set(gm, info)
            return PassResult(gm, False)
        for n in nodes:
            A.set_annotation(n, A.Annotation(status=A.FLOAT_EXACT_INPUT, reason=REASON))
        spec = replace(ann.input_specs[0], observer="unit_scale")
        A.set_annotation(conv, ann.with_(input_specs={**ann.input_specs, 0: spec}))
        return PassResult(gm, True)
