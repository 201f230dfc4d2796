"""The toy backend: int8 conv2d / linear of the reference graph on int32-accumulating reference kernels
(``kernels.py``); every other node runs in float exactly as the reference graph says.

It is a :class:`qcompile.backends.TableBackend`: the support table says what is int8, the base class builds
the prepare passes (normalize, fold batch-norm, fuse, annotate) from it. ``lower`` rewrites a copy of the
reference graph: each ``dequantize -> conv2d / linear -> quantize`` group becomes one kernel call on the
int8 codes; a group it cannot take stays float with the reason in the report.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx

from qcompile.backends import Lowered, TableBackend
from qcompile.backends.support import ANCHOR, Capabilities, OpSupport
from qcompile.config import QConfig
from qcompile.ir import erase_dead_params, get_attr_value, module_path
from qcompile.specs import ActivationSpec, QuantSpec, WeightSpec

from . import kernels

aten, qd = torch.ops.aten, torch.ops.quantized_decomposed
_Q, _DQ = qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default
_DQ_W = (qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default)
_CONV_ARGS = (("stride", 3, 1), ("padding", 4, 0), ("dilation", 5, 1), ("groups", 6, 1))

TABLE = [  # what runs in int8: conv2d and linear with int8 input, int8 weights (per channel or per tensor)
    OpSupport("conv2d", ("conv2d",), ANCHOR, act_args=(0,), weight_arg=1, bias_arg=2, note="toy int8 conv2d"),
    OpSupport("linear", ("linear",), ANCHOR, act_args=(0,), weight_arg=1, bias_arg=2, note="toy int8 linear"),
]
NOTES = {"relu": "the toy backend has no int8 relu: it runs in float between int8 layers"}
CAPABILITIES = Capabilities(act_dtypes=("int8",), act_symmetric=(False, True), act_bits=(8,),
                            weight_bits=(8,), weight_symmetric=(True,), modes=("static", "qat"),
                            unsupported_notes=NOTES)


@dataclass(frozen=True)
class ToyOptions:
    """narrow_weights: 8-bit weights in [-127, 127] (as many int8 accelerators want) instead of [-128, 127]."""

    narrow_weights: bool = False


class ToyBackend(TableBackend):
    name = "toy"
    Options = ToyOptions
    static_notes = NOTES
    mode_capabilities = {"static": CAPABILITIES}

    def is_available(self):
        return True, ""  # plain torch: nothing to install

    # -- what is int8 (data for TableBackend) ---------------------------------------------------------
    def support_table(self) -> list:
        return TABLE

    def default_config(self, mode: str) -> QConfig:
        return QConfig(weights=WeightSpec(bits=8, granularity="per_channel", symmetric=True),
                       activations=ActivationSpec(observer="minmax"))

    def act_spec(self, a: ActivationSpec) -> QuantSpec:
        return QuantSpec(dtype=torch.int8, bits=a.bits, symmetric=a.symmetric, observer=a.observer,
                         percentile=a.percentile)

    def weight_spec(self, w: WeightSpec, row, node) -> QuantSpec:
        gran = w.granularity if w.granularity in row.weight_granularities else "per_tensor"
        return QuantSpec(dtype=torch.int8, bits=w.bits, symmetric=True, narrow=self.options.narrow_weights,
                         granularity=gran, axis=0 if gran == "per_channel" else None, observer=w.observer)

    # -- lowering and running -----------------------------------------------------------------------
    def lower(self, reference: fx.GraphModule, example_inputs, mode: str) -> Lowered:
        gm = copy.deepcopy(reference)
        low = Lowered(gm=gm)
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in (aten.conv2d.default, aten.linear.default):
                why = _lower_one(gm, node, low)
                if why:
                    low.fallbacks[node.name] = why
        erase_dead_params(gm)  # the weights' zero points (symmetric: 0) are no longer read
        gm.recompile()
        return low

    def run(self, lowered: Lowered, args, kwargs):
        with torch.no_grad():
            return lowered.gm(*args, **kwargs)

    def runtime_name(self) -> str:
        return f"toy int8 reference kernels (torch {torch.__version__.split('+')[0]}, int32 accumulation)"

    def verify_runtime(self, artifact, mode: str) -> dict:
        low = artifact.lowered
        return {"toy_int8_kernels": len(low.kernels), "toy_float_fallbacks": dict(low.fallbacks)}


def _lower_one(gm: fx.GraphModule, node: fx.Node, low: Lowered) -> str | None:
    """Replace one ``dequantize -> conv2d / linear [-> quantize]`` group by a kernel call; a reason if not."""
    x_dq, w_dq = node.args[0], node.args[1]
    if not (isinstance(x_dq, fx.Node) and x_dq.target == _DQ):
        return "input is float (not int8)"
    if not (isinstance(w_dq, fx.Node) and w_dq.target in _DQ_W and w_dq.args[0].op == "get_attr"):
        return "weight is not an int8 constant"
    users = list(node.users)
    out_q = users[0] if len(users) == 1 and users[0].target == _Q else None
    if out_q is None and any(u.target == _Q for u in users):
        return "output is quantized more than once"
    w_scale = w_dq.args[1]  # a get_attr node (per channel) or a float (per tensor)
    out = (out_q.args[1], out_q.args[2], out_q.args[3], out_q.args[4]) if out_q else (None, 0, -128, 127)
    bias = node.args[2] if len(node.args) > 2 else None
    args = [x_dq.args[0], x_dq.args[1], x_dq.args[2], w_dq.args[0], w_scale, bias, *out]
    if node.target == aten.conv2d.default:
        fn = kernels.conv2d_int8
        args += [node.args[i] if len(node.args) > i else node.kwargs.get(k, d) for k, i, d in _CONV_ARGS]
    else:
        fn = kernels.linear_int8
    with gm.graph.inserting_before(out_q or node):
        new = gm.graph.call_function(fn, tuple(args))
    new.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
    (out_q or node).replace_all_uses_with(new)
    name = "conv2d" if fn is kernels.conv2d_int8 else "linear"
    low.kernels[node.name] = f"toy int8 {name} (int32 accumulate" + (", int8 out)" if out_q else ", float out)")
    if out_q is not None:
        low.taps[out_q.name] = new.name
    layer, n_weights = module_path(node), get_attr_value(gm, w_dq.args[0]).numel()
    low.storage[w_dq.args[0].target] = (layer, "codes", n_weights)  # for the report's stored-bytes rows
    if isinstance(w_scale, fx.Node):
        low.storage[w_scale.target] = (layer, "scales", 0)
    return None


