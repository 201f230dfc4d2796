"""x86 lowering of dynamic-mode linears: activations quantized at run time, int8 weights.

==========================  ==================================================================
per-token int8 activations  row-wise scale chosen per call, ``torch._int_mm`` (int8 x int8 -> int32)
                            with the per-channel weight scale applied to the int32 result
per-tensor uint8            ``quantized::linear_dynamic`` (fbgemm: quantizes x per tensor inside)
==========================  ==================================================================

A dynamic chain the rules cannot run (other dtypes / asymmetric weights) keeps the reference ops
(choose parameters, quantize, dequantize, fp32 linear) and is reported as a fallback.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from qcompile.errors import ConfigError
from qcompile.int_weight import int_weight
from qcompile.ir import get_attr_value
from qcompile.passes.rewrite import Match, Rule, RuleSet
from qcompile.specs import QuantSpec

from .kernel_choice import cpu_has_vnni
from .weight_only import Rewriter, _rows

aten, qd, qops = torch.ops.aten, torch.ops.quantized_decomposed, torch.ops.quantized


# -- kernels ----------------------------------------------------------------------------------------
def _row_range(x2):
    """Per-row (min, max) widened to contain 0. Two plain reductions: ``aminmax(dim=-1)`` is ~8x slower here."""
    return x2.amin(-1).clamp_(max=0), x2.amax(-1).clamp_(min=0)


def linear_dynamic_per_token(x, w_t, w_scale, bias):
    """Symmetric int8 per-row activations (``choose_qparams_per_token``) times int8 weights ``[K, N]``:
    row range, ``round(x / s)`` (|x / s| <= 127 by construction), int8 GEMM, two epilogue passes."""
    x2 = _rows(x)
    lo, hi = _row_range(x2)
    s = torch.maximum(-lo, hi).clamp_(min=1e-5).div_(127)[:, None]
    q = (x2 * (1.0 / s)).round_().to(torch.int8)
    y = torch._int_mm(q, w_t) * w_scale
    y = torch.addcmul(bias, y, s) if bias is not None else y.mul_(s)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def linear_dynamic_per_token_affine(x, w_t, w_scale, w_colsum, bias):
    """Affine int8 per-row activations (``choose_qparams_per_token_asymmetric``): the zero-point term
    ``-(s zp) (w_scale colsum)`` and the bias are one rank-2 update of the scaled int32 result."""
    x2 = _rows(x)
    lo, hi = _row_range(x2)
    s = ((hi - lo) / 255).clamp_(min=torch.finfo(torch.float32).eps)
    zp = _nudged_zero_point(lo, hi, s)
    q = torch.addcmul(zp[:, None], x2, (1.0 / s)[:, None]).round_().clamp_(-128, 127).to(torch.int8)
    y = torch._int_mm(q, w_t) * w_scale
    y.mul_(s[:, None])
    u = torch.stack([-(s * zp), torch.ones_like(s)], dim=1)
    v = torch.stack([w_scale * w_colsum, bias if bias is not None else torch.zeros_like(w_scale)])
    y.addmm_(u, v)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _nudged_zero_point(lo, hi, s):
    """The zero point ``choose_qparams_per_token_asymmetric`` picks (int8 [-128, 127])."""
    from_min, from_max = -128 + lo / s, 127 + hi / s
    zp = torch.where(from_min + from_max > 0, -128 - lo / s, 127 - hi / s)
    return zp.clamp(-128, 127).round()


def linear_dynamic_fbgemm(x, packed, reduce_range: bool):
    return qops.linear_dynamic(x, packed, reduce_range)


# -- the rule ---------------------------------------------------------------------------------------
def _chain(x):
    """(float source, choose op, quant_min, quant_max, dtype) of a dynamic quantize chain, or None."""
    if not isinstance(x, fx.Node) or x.target not in (qd.dequantize_per_token.default, qd.dequantize_per_tensor.tensor):
        return None
    q = x.args[0]
    scale = q.args[1]
    if scale.target != operator.getitem:
        return None
    choose = scale.args[0]
    return choose.args[0], choose.target, q.args[3], q.args[4], q.args[5]


def _weight(rw: Rewriter, node: fx.Node):
    """int8 codes ``[N, K]`` and scale ``[N]`` of a symmetric per-row weight, or a reason."""
    w = int_weight(rw.gm, node.args[1])
    if w is None or w.q.dim() != 2 or w.group_size is not None:
        return "the weight is not a per-channel / per-tensor integer constant"
    n = w.q.shape[0]
    s, z = w.per_row(n)
    if bool((z != 0).any()) or w.q.dtype != torch.int8:
        return "dynamic kernels need symmetric int8 weights"
    return w.q, s.contiguous()


def _dynamic_linear(node: fx.Node) -> bool:
    return node.target == aten.linear.default and _chain(node.args[0]) is not None


def linear_dynamic(m: Match):
    rw, node = m.ctx, m.anchor
    src, choose, qmin, qmax, dtype = _chain(node.args[0])
    bias = node.args[2] if len(node.args) > 2 else None
    weight = _weight(rw, node)
    if isinstance(weight, str):
        return weight
    q, s = weight
    n, k = q.shape
    rw.tag(bias, node.name, "bias")
    if choose in (qd.choose_qparams_per_token.default, qd.choose_qparams_per_token_asymmetric.default):
        w_t = rw.const(q.t().contiguous(), node, node.name, "codes", n * k)
        scale = rw.const(s, node, node.name, "scales")
        if choose == qd.choose_qparams_per_token.default:
            return rw.emit(node, linear_dynamic_per_token, (src, w_t, scale, bias),
                           "torch._int_mm (int8 per-token activations, symmetric)")
        colsum = rw.const(q.float().sum(1), node, node.name, "zero_points")
        return rw.emit(node, linear_dynamic_per_token_affine, (src, w_t, scale, colsum, bias),
                       "torch._int_mm (int8 per-token activations, affine)")
    if choose == qd.choose_qparams.tensor and dtype == torch.uint8 and qmin == 0 and qmax in (127, 255):
        qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros(n, dtype=torch.long), 0)
        b = None if bias is None else get_attr_value(rw.gm, bias).detach().float()
        packed = qops.linear_prepack(qw, b)  # the bias lives in the packed weight
        rw.result.storage.pop(getattr(bias, "target", None), None)
        node_packed = rw.const(packed, node, node.name, "packed", n * k)
        return rw.emit(node, linear_dynamic_fbgemm, (src, node_packed, qmax == 127),
                       f"quantized::linear_dynamic (uint8 per-tensor activations{', reduce_range' if qmax == 127 else ''})")
    return f"no x86 dynamic kernel for {getattr(choose, '__name__', choose)} with {dtype} [{qmin}, {qmax}]"


# -- LSTM / GRU: PyTorch's dynamic quantized recurrent kernels ------------------------------------------
def lstm_dynamic(x, hx, cells, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return torch.quantized_lstm(x, hx, cells, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                                dtype=torch.qint8, use_dynamic=True)


def gru_dynamic(x, hx, cells, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return torch.quantized_gru(x, hx, cells, has_biases, num_layers, dropout, train, bidirectional, batch_first)


def _packed(w, bias):
    q = torch._make_per_channel_quantized_tensor(w.q, w.scale.double().reshape(-1),
                                                 w.zero_point.long().reshape(-1), 0)
    return qops.linear_prepack(q, bias)


def _recurrent(node: fx.Node) -> bool:
    return node.target in (aten.lstm.input, aten.gru.input)


def recurrent_dynamic(m: Match):
    """``aten.lstm`` / ``aten.gru`` with int8 weight matrices -> ``quantized_lstm`` / ``quantized_gru``
    (fbgemm gate GEMMs with per-tensor dynamic activations; 7-bit activations without VNNI)."""
    rw, node = m.ctx, m.anchor
    params, has_biases = node.args[2], node.args[3]
    stride = 4 if has_biases else 2
    cells = []
    for c in range(0, len(params), stride):
        w_ih, w_hh = (int_weight(rw.gm, p) for p in params[c:c + 2])
        if w_ih is None or w_hh is None or w_ih.group_size or w_ih.q.dtype != torch.int8:
            return "recurrent weights are not per-channel int8 constants"
        b_ih, b_hh = ((get_attr_value(rw.gm, b).detach().float() for b in params[c + 2:c + 4]) if has_biases
                      else (torch.zeros(w_ih.q.shape[0]), torch.zeros(w_hh.q.shape[0])))
        cell = qops.make_quantized_cell_params_dynamic(_packed(w_ih, b_ih), _packed(w_hh, b_hh), b_ih, b_hh,
                                                       not cpu_has_vnni())  # reduce_range on AVX2 (saturation)
        cells.append(rw.const(cell, node, node.name, "packed", w_ih.q.numel() + w_hh.q.numel()))
    lstm = node.target == aten.lstm.input
    return rw.emit(node, lstm_dynamic if lstm else gru_dynamic, (node.args[0], node.args[1], cells, *node.args[3:]),
                   f"aten.quantized_{'lstm' if lstm else 'gru'} (fbgemm, dynamic int8 gates)")


RULES = RuleSet([
    # linear(dequantize(quantize(x, choose_qparams(x))), dequantize(w int8)) -> one dynamic int8 kernel
    Rule("linear_dynamic", (_dynamic_linear,), rewrite=linear_dynamic),
    # lstm / gru(x, [dequantize(w int8)...]) -> quantized_lstm / quantized_gru (dynamic int8 gates)
    Rule("recurrent_dynamic", (_recurrent,), rewrite=recurrent_dynamic),
])


# -- specs (the backend's SpecMaker hooks for mode="dynamic") ------------------------------------------
def act_spec(a) -> QuantSpec:
    """per_token: int8 (symmetric by default, affine if asked); per_tensor: uint8 affine (fbgemm), 7-bit if bits=7."""
    if a.granularity == "per_token":
        if a.bits != 8:
            raise ConfigError(f"x86 dynamic per-token activations are 8-bit, got bits={a.bits}")
        return QuantSpec(dtype=torch.int8, bits=8, symmetric=a.symmetric, granularity="per_token", dynamic=True)
    if a.granularity == "per_tensor":
        if a.symmetric or a.bits not in (7, 8):
            raise ConfigError("x86 dynamic per-tensor activations are affine uint8 (fbgemm's linear_dynamic): "
                              "use ActivationSpec(granularity='per_tensor', symmetric=False, bits=8 or 7)")
        return QuantSpec(dtype=torch.uint8, bits=8, reduce_range=a.bits == 7, dynamic=True)
    raise ConfigError(f"x86 dynamic activations are per_token or per_tensor, got {a.granularity!r}")


def weight_spec(w, row, node, max_bits: int = 8) -> QuantSpec:
    """Symmetric int8 per-channel / per-tensor; ``max_bits`` 7 on CPUs without VNNI, where the u8 x s8
    pair sums of fbgemm's and oneDNN's AVX2 int8 GEMMs saturate int16 (bench/x86_kernels.py)."""
    if w.dtype != "int" or w.bits != 8 or not w.symmetric or w.granularity == "per_group":
        raise ConfigError("x86 dynamic mode runs symmetric int8 per-channel / per-tensor weights "
                          f"(got {w}); low-bit or group-wise weights are mode='weight_only'")
    gran = w.granularity
    return QuantSpec(dtype=torch.int8, bits=min(8, max_bits), symmetric=True, granularity=gran,
                     axis=0 if gran == "per_channel" else None, observer=w.observer)
