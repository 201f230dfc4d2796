"""x86 lowering of graphs that compute in float: weight-only linears / embeddings (and the shared
rewriter the dynamic rules of ``dynamic.py`` plug into).

Each rule looks at one reference node (``linear``, ``embedding``) whose weight is a dequantize of an
integer / NF4 constant and replaces it with a kernel call on the stored low-bit weight:

=================  =====================================================================================
int8 per-channel   qcompile's GEMV (csrc/wo_gemv.c, <= 16 rows; int16 activations per 128-block with the
                   default weight_only_activations, fp32 with "fp32"); where not built
                   ``aten._weight_int8pack_mm`` (affine weights: one row-sum fix-up)
int2..4 per-group  qcompile's GEMV (codes packed two per byte, groups % 32 == 0, <= 16 rows; dequantize +
                   fp32 GEMM above); where not built ``aten._weight_int4pack_mm_for_cpu`` (groups 32..256,
                   N % 16 == 0)
NF4                qcompile's own kernel (csrc/nf4_kernel.c): codes decoded via the 16-entry table in
                   registers, group scale applied once per group; where not built: dequantize every call
anything else      int codes kept, dequantized at every call (memory saved, slower than float)
embedding          rows gathered from the int (4-bit: packed) table, then dequantized
=================  =====================================================================================

The report says which one ran: a dequantize-at-every-call kernel is slower than float, and when the GEMV
library is missing the torch kernels that replace it reach about half of the memory bandwidth (a warning).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from qcompile.errors import ConfigError
from qcompile.int_weight import IntWeight, int_weight
from qcompile.ir import copy_meta, get_attr_value, module_path
from qcompile.kernels import nf4_kernel_info, nf4_linear as nf4_kernel
from qcompile.kernels import (pack_int4_blocks, pack_int8_rows, unpack_int8_rows, wo_int8_linear, wo_int16_ok,
                              wo_kernel_info, wo_plan)
from qcompile.lowbit import dequantize_nf4, dequantize_scales_ref, nf4_values, pack_int4, unpack_int4
from qcompile.passes import rewrite
from qcompile.passes.rewrite import Match, Rule, RuleSet
from qcompile.specs import NF4Spec, QuantSpec, WeightSpec

from .wo_gemv import (_INT4_GROUPS, BoundGemv, _gemv_out, _int4_gemv_pack, _warn_if_missing, bound_gemv,
                      int4_group, linear_int4_gemv, linear_nf4_gemv, nf4_scales, rows_interleave, wo_kernel_note)

aten, qd, qc = torch.ops.aten, torch.ops.quantized_decomposed, torch.ops.qcompile
NF4_KERNEL_ROWS = 16  # the NF4 kernel reuses each decoded group for up to 16 rows; above, dequantize + GEMM
KERNEL_MAX_ROWS = 32  # the weight-only kernels are GEMVs: cost grows with rows; above, int8 dequantizes + fp32 GEMM
WO_ROWS = 16  # rows per call of qcompile's GEMV (csrc/wo_gemv.c WO_MAX_ROWS)


# -- kernels (call_function targets of the lowered graph) -----------------------------------------
def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _finish(y, x, bias):
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def linear_int8_weight(x, w_int8, scale, row_fix, bias, act_dtype: torch.dtype, gemv: bool = False,
                       interleave: int = 1):
    """``x @ ((q - z) * s)^T``: qcompile's GEMV (``gemv``: it was built when lowering; its int16-activation body
    when ``act_dtype`` is bf16, the reduced-precision choice) for <= 16 rows, and with that body up to 32 rows
    in calls of 16 (faster than torch's kernel there: 4096 x 4096, 16 / 24 / 32 rows 3.3 / 5.0 / 6.4 ms against
    3.9 / 5.6 / 7.3); else torch's int8-weight kernel up to 32 rows (``act_dtype`` bf16 runs the vectorised
    kernel, fp32 a ~6x slower one) and dequantize + fp32 GEMM above. ``interleave``: the codes' row interleave
    (``kernels.pack_int8_rows``; 2 only with the int16 body)."""
    if gemv:
        x2 = x if x.dim() == 2 else _rows(x)
        rows, fast = x2.shape[0], act_dtype == torch.bfloat16
        int16_body = fast and wo_int16_ok("int8", x2.shape[1])  # measured faster than torch's kernel to 32 rows
        if rows <= WO_ROWS or (int16_body and rows <= KERNEL_MAX_ROWS):
            parts = [wo_int8_linear(x2[i:i + WO_ROWS], w_int8, scale, row_fix, bias, fast=fast, interleave=interleave)
                     for i in range(0, rows, WO_ROWS)]
            if all(y is not None for y in parts):
                return _gemv_out(parts[0] if len(parts) == 1 else torch.cat(parts), x)
    w_int8 = unpack_int8_rows(w_int8, interleave)
    x2 = _rows(x)
    if x2.shape[0] <= KERNEL_MAX_ROWS:
        y = aten._weight_int8pack_mm(x2.to(act_dtype), w_int8, scale.to(act_dtype)).float()
        if row_fix is not None:  # affine weights: subtract sum(x) * s * z
            y = y - x2.sum(-1, keepdim=True) * row_fix
    else:
        w = w_int8.float() * scale.float()[:, None]
        if row_fix is not None:
            w = w - row_fix[:, None]
        y = F.linear(x2, w)
    return _finish(y, x, bias)


def linear_int4(x, packed, group_size: int, scales_and_zeros, bias):
    """Activations in the scales' dtype (bf16: the fast kernel, 4x float at 4096x4096 batch 1; fp32: 6x slower)."""
    y = aten._weight_int4pack_mm_for_cpu(_rows(x).to(scales_and_zeros.dtype), packed, group_size, scales_and_zeros)
    return _finish(y.float(), x, bias)


def linear_nf4(x, packed, absmax, group_size: int, bias):
    """NF4 codes decoded in registers by qcompile's C kernel for few rows (``qcompile.kernels``); for
    many rows, or where the kernel was not built, the weight is dequantized once per call + fp32 GEMM."""
    x2 = _rows(x)
    y = nf4_kernel(x2.float(), packed, absmax, group_size, bias) if x2.shape[0] <= NF4_KERNEL_ROWS else None
    if y is None:
        return F.linear(x, dequantize_nf4(packed, absmax, group_size), bias)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def nf4_kernel_note(group_size: int) -> tuple[str, str | None]:
    """The report's kernel string for an NF4 linear, and a warning when it runs the slow fallback."""
    info = nf4_kernel_info()
    if info["available"] and group_size % 16 == 0:
        return (f"nf4: qcompile LUT-decode kernel ({info['isa']}; codes decoded in registers, no fp32 weight) "
                f"for <= {NF4_KERNEL_ROWS} rows, else dequantize once per call + fp32 GEMM"), None
    why = ("the kernel was not built at install time (no C compiler or not an x86 CPU)" if not info["available"]
           else f"group_size={group_size} is not a multiple of 16")
    note = f"nf4: packed codes dequantized to fp32 at every call + fp32 linear ({why})"
    return note, (f"NF4 on this CPU runs without its kernel because {why}: every call dequantizes the whole "
                  f"weight, typically 20-50x slower than float at batch 1 and far slower than int4 "
                  f"(WeightSpec(bits=4, group_size=128)); use int4, or install qcompile with a C compiler")


def _expand_params(p, group_size: int):
    """Per-row ``[..., 1]`` or per-group ``[..., K/g]`` parameters broadcast over ``[..., K]``."""
    return p.float().repeat_interleave(group_size, -1) if group_size else p.float()[..., None]


def linear_dequant(x, q, scale, zero_point, group_size: int, bias):
    w = q.float()
    if zero_point is not None:
        w = w - _expand_params(zero_point, group_size)
    return F.linear(x, w * _expand_params(scale, group_size), bias)


def embedding_int(ids, q, scale, zero_point, group_size: int, packed: bool):
    rows = q[ids]
    rows = (unpack_int4(rows) if packed else rows).float()
    if zero_point is not None:
        rows = rows - _expand_params(zero_point[ids], group_size)
    return rows * _expand_params(scale[ids], group_size)


def embedding_nf4(ids, packed, absmax, group_size: int):
    codes = unpack_int4(packed[ids])
    return nf4_values(codes) * absmax[ids].repeat_interleave(group_size, -1)


# -- the rewriter -------------------------------------------------------------------------------
@dataclass
class FloatLowerResult:
    """Like the static ``LowerResult``; ``storage`` tags stored constants: attr -> (layer, role, weights)."""

    gm: fx.GraphModule
    kernels: dict = field(default_factory=dict)
    fallbacks: dict = field(default_factory=dict)
    taps: dict = field(default_factory=dict)
    storage: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Lowered:
    kernel: str


class Rewriter:
    """Rewrite a copy of the reference graph node by node with the rewrite engine's loop. A rule's pattern
    is one node; its ``rewrite(match)`` (``match.ctx`` is this rewriter) returns :class:`Lowered` (the node
    now calls a kernel), a reason string (the node keeps its reference ops, reported) or None (not its case)."""

    def __init__(self, ref: fx.GraphModule, rules, kernel_dtype: torch.dtype = torch.bfloat16):
        self.gm, self.kernel_dtype = copy.deepcopy(ref), kernel_dtype  # activation dtype of weight-only kernels
        self.rules = rules if isinstance(rules, RuleSet) else RuleSet(rules)
        self.result, self._n = FloatLowerResult(self.gm), 0

    def const(self, value, before: fx.Node, layer: str, role: str, weights: int = 0) -> fx.Node:
        self._n += 1
        name = f"_lowered_{role}_{self._n}"
        if isinstance(value, torch.Tensor):
            self.gm.register_buffer(name, value.detach().contiguous())
        else:
            setattr(self.gm, name, value)  # a packed kernel weight (ScriptObject)
        self.result.storage[name] = (layer, role, weights)
        with self.gm.graph.inserting_before(before), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fx warns about get_attr of a non-tensor attribute
            return self.gm.graph.get_attr(name)

    def tag(self, node, layer: str, role: str, weights: int = 0) -> None:
        """Account a reference constant the kernel keeps using (bias, NF4 codes...)."""
        if isinstance(node, fx.Node) and node.op == "get_attr":
            self.result.storage[node.target] = (layer, role, weights)

    def emit(self, node: fx.Node, fn, args, kernel: str) -> Lowered:
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_function(fn, tuple(args))
        copy_meta(node, new)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)
        return Lowered(kernel)

    def run(self) -> FloatLowerResult:
        for step in rewrite.run(self.gm.graph.nodes, self.rules, self, skip=lambda n: n.op != "call_function"):
            if step.applied:
                self.result.kernels[step.node.name] = step.result.kernel
            elif step.reason is not None:
                self.result.fallbacks[step.node.name] = step.reason
        bind_gemvs(self.gm, self.result.storage)
        self.gm.graph.eliminate_dead_code()
        used = {n.target for n in self.gm.graph.nodes if n.op == "get_attr"}
        for name in [b for b, _ in self.gm.named_buffers() if b not in used and "." not in b]:
            delattr(self.gm, name)
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()
        return self.result


def _bound(gm, node, storage):
    """A :class:`BoundGemv` for a GEMV call node whose constants are all get_attr nodes (or None), else None."""
    consts = node.args[1:]
    if not all(a is None or not isinstance(a, fx.Node) or a.op == "get_attr" for a in consts):
        return None
    val = [get_attr_value(gm, a) if isinstance(a, fx.Node) else a for a in consts]
    if not all(not isinstance(v, torch.Tensor) or v.is_contiguous() and v.device.type == "cpu" for v in val):
        return None
    if node.target is linear_int8_weight:
        q8, scale, fix, bias, act_dtype, _, il = val
        if q8.dtype != torch.int8:
            return None
        (n, k), plan = q8.shape, wo_plan("int8", q8.shape[1], q8, scale, fix, bias,
                                          fast=act_dtype == torch.bfloat16, interleave=il)
    else:
        packed, g, scale, zero, zconst, bias, fast, il = val
        if packed.dtype != torch.uint8:
            return None
        n, k = packed.shape[0], scale.shape[1] * g
        plan = wo_plan("int4", k, packed, scale, zero, bias, fast=fast, interleave=il, group_size=g, zconst=zconst)
    pieces = tuple((a.target, v) + tuple(storage.get(a.target, ("", "", 0))[1:])
                   for a, v in zip(consts, val) if isinstance(a, fx.Node))
    layer = next((storage[a.target][0] for a in consts if isinstance(a, fx.Node) and a.target in storage), "")
    return BoundGemv(plan, n, k, node.target, tuple(val), pieces), layer


def bind_gemvs(gm: fx.GraphModule, storage: dict) -> None:
    """Every GEMV call whose constants are get_attr nodes becomes ``bound_gemv(x, <one plain attribute>)``
    (:class:`BoundGemv`: its Python path is what a batch-1 call spends outside the kernel). Same numbers;
    the report's storage rows list the same tensors, now through the bound object."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not (node.target is linear_int4_gemv or (
                node.target is linear_int8_weight and len(node.args) > 6 and node.args[6] is True)):
            continue
        made = _bound(gm, node, storage)
        if made is None:
            continue
        obj, layer = made
        name = f"_gemv_{node.name}"
        setattr(gm, name, obj)
        storage[name] = (layer, "", 0)
        with gm.graph.inserting_before(node), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fx warns about get_attr of a non-tensor attribute
            attr = gm.graph.get_attr(name)
        node.target, node.args, node.kwargs = bound_gemv, (node.args[0], attr), {}


# -- weight-only rules ----------------------------------------------------------------------------
def _int8_rows(w: IntWeight, n: int):
    """int8 codes, scale [N] and the affine fix-up ``s * z`` (None when symmetric) for per-row weights."""
    s, z = w.per_row(n)
    shift = 128 if w.quant_max > 127 else 0
    q8 = (w.q.int() - shift).to(torch.int8)
    z = z - shift
    return q8, s.contiguous(), ((s * z).contiguous() if bool((z != 0).any()) else None)


def _int4_pack(w: IntWeight):
    """(packed [N, K/2], group size, scales-and-zeros [K/g, N, 2]) for the int4 CPU kernel, or a reason."""
    n, k = w.q.shape
    if w.bits > 4:
        return f"{w.bits}-bit values"
    if n % 16:
        return f"the int4 kernel needs out_features % 16 == 0 (got {n})"
    g = w.group_size or next((c for c in _INT4_GROUPS if k % c == 0), None)
    if g not in _INT4_GROUPS or k % g:
        return f"the int4 kernel needs groups of 32/64/128/256 dividing in_features={k} (got {g})"
    s, z = w.grouped(k, g)
    codes = (w.q.int() - w.quant_min).to(torch.int32)
    packed = aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    zero = (8 + w.quant_min - z) * s  # kernel: (code - 8) * scale + zero
    return packed, g, torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")


def _zero_points(z: torch.Tensor, dtype: torch.dtype):
    """Zero points stored in the codes' dtype (they lie on the same grid); None when all are 0."""
    return None if not bool((z != 0).any()) else z.round().to(dtype).contiguous()


def _is_dynamic_act(x) -> bool:
    return isinstance(x, fx.Node) and x.target in (qd.dequantize_per_token.default, qd.dequantize_per_tensor.tensor)


def _weight_only_linear(node: fx.Node) -> bool:
    return node.target == aten.linear.default and not _is_dynamic_act(node.args[0])


def _linear_nf4(rw, node, x, wdq, bias):
    """linear(x, dequantize_nf4(packed, absmax)): the int4 GEMV with NF4's table, else the NF4 kernel /
    dequantize fallback (``nf4_kernel_note``)."""
    packed, absmax, g = wdq.args
    n, k = rw.gm.get_buffer(packed.target).shape[0], rw.gm.get_buffer(packed.target).shape[1] * 2
    rw.tag(packed, node.name, "codes", n * k)
    rw.tag(absmax, node.name, "scales")
    for a in (absmax.args[:3] if absmax.op == "call_function" else ()):
        rw.tag(a, node.name, "scales")
    if absmax.op == "call_function" and absmax.target == qc.dequantize_scales.default:
        absmax.target = dequantize_scales_ref  # same math, without the custom op's dispatch (~0.2 ms a call)
    if wo_kernel_info()["available"] and g % 16 == 0:  # the int4 GEMV with the NF4 table as its code values
        if absmax.op == "call_function" and absmax.target == dequantize_scales_ref:
            absmax.target = nf4_scales  # same values, in C on the calling thread
        blocks = pack_int4_blocks(unpack_int4(rw.gm.get_buffer(packed.target)))
        return rw.emit(node, linear_nf4_gemv, (x, rw.const(blocks, node, node.name, "codes", n * k), absmax, g, bias),
                       f"nf4: qcompile LUT-decode kernel (the int4 GEMV of csrc/wo_gemv.c with NF4's table; "
                       f"{wo_kernel_info()['isa']}, fp32 activations, codes decoded in registers, no fp32 "
                       f"weight) for <= {wo_kernel_info()['max_rows']} rows, else dequantize + fp32 GEMM")
    note, warning = nf4_kernel_note(g)
    if warning:
        warnings.warn(f"{node.name}: {warning}", stacklevel=2)
    return rw.emit(node, linear_nf4, (x, packed, absmax, g, bias), note)


def linear_weight_only(m: Match):
    rw, node = m.ctx, m.anchor
    x, wdq = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    rw.tag(bias, node.name, "bias")
    if isinstance(wdq, fx.Node) and wdq.target == qc.dequantize_nf4.default:
        return _linear_nf4(rw, node, x, wdq, bias)
    w = int_weight(rw.gm, wdq)
    if w is None or w.q.dim() != 2:
        return None
    n, k = w.q.shape
    g = int4_group(w)
    # X86Options.weight_only_activations bf16 (the default): the int16-activation body, which reads 4 rows a tile
    fast = g is not None and rw.kernel_dtype == torch.bfloat16 and wo_int16_ok("int4", k, g)
    il = rows_interleave("int4", n, fast)
    gemv4 = _int4_gemv_pack(w, il)
    if not isinstance(gemv4, str) and wo_kernel_info()["available"]:
        packed, g, scale, zero, zconst = gemv4
        args = (x, rw.const(packed, node, node.name, "codes", n * k), g, rw.const(scale, node, node.name, "scales"),
                None if zero is None else rw.const(zero, node, node.name, "zero_points"), zconst, bias, fast, il)
        tiles = ", 4 rows interleaved per block" if il == 4 else ""
        return rw.emit(node, linear_int4_gemv, args, f"{wo_kernel_note('int4', fast)[0]} (int{w.bits} g{g}{tiles}), "
                                                     f"dequantize + fp32 GEMM above")
    int4 = _int4_pack(w)
    if not isinstance(int4, str):
        missing = _warn_if_missing(node, "int4")
        packed, g, sz = int4
        sz = rw.const(sz.to(rw.kernel_dtype), node, node.name, "scales")
        args = (x, rw.const(packed, node, node.name, "codes", n * k), g, sz, bias)
        return rw.emit(node, linear_int4, args, f"aten._weight_int4pack_mm_for_cpu (int{w.bits} g{g}, "
                                                f"{_dtype_name(rw.kernel_dtype)} activations){missing}")
    if w.group_size is None and k % 16 == 0:  # both int8 kernels read K in blocks of 16
        int16 = rw.kernel_dtype == torch.bfloat16 and wo_int16_ok("int8", k)  # the int16-activation body runs
        gemv = wo_kernel_note("int8", int16)[0]
        missing = _warn_if_missing(node, "int8") if w.bits > 4 else ""
        q8, s, fix = _int8_rows(w, n)
        il = rows_interleave("int8", n, int16)
        args = (x, rw.const(pack_int8_rows(q8, il), node, node.name, "codes", n * k), rw.const(s, node, node.name, "scales"),
                None if fix is None else rw.const(fix, node, node.name, "zero_points"), bias, rw.kernel_dtype,
                gemv is not None, il)
        note = "" if w.bits > 4 else f" ({w.bits}-bit values stored as int8: {int4})"
        if int16:
            tiles = ", 2 rows interleaved per block" if il == 2 else ""
            return rw.emit(node, linear_int8_weight, args,
                           f"{gemv}{tiles}, up to {KERNEL_MAX_ROWS} rows in calls of {WO_ROWS}; dequantize + fp32 "
                           f"GEMM above{note}")
        return rw.emit(node, linear_int8_weight, args,
                       f"{gemv + ', then ' if gemv else ''}aten._weight_int8pack_mm ({_dtype_name(rw.kernel_dtype)} "
                       f"activations, <= {KERNEL_MAX_ROWS} rows; dequantize + fp32 GEMM above){missing}{note}")
    scale, zp = (w.scale.float().reshape(n, -1), w.zero_point.reshape(n, -1)) if w.group_size else w.per_row(n)
    z = _zero_points(zp, w.q.dtype)
    args = (x, rw.const(w.q, node, node.name, "codes", n * k), rw.const(scale.contiguous(), node, node.name, "scales"),
            None if z is None else rw.const(z, node, node.name, "zero_points"), w.group_size or 0, bias)
    why = int4 if w.group_size else f"in_features={k} is not a multiple of 16"
    return rw.emit(node, linear_dequant, args,
                   f"int{w.bits}: no kernel ({why}); codes dequantized at every call + fp32 linear")


def embedding_weight_only(m: Match):
    rw, node = m.ctx, m.anchor
    wdq, ids = node.args[0], node.args[1]
    if isinstance(wdq, fx.Node) and wdq.target == qc.dequantize_nf4.default:
        packed, absmax, g = wdq.args
        shape = rw.gm.get_buffer(packed.target).shape
        rw.tag(packed, node.name, "codes", shape[0] * shape[1] * 2)
        rw.tag(absmax, node.name, "scales")
        for a in (absmax.args[:3] if absmax.op == "call_function" else ()):
            rw.tag(a, node.name, "scales")
        if absmax.op == "call_function" and absmax.target == qc.dequantize_scales.default:
            absmax.target = dequantize_scales_ref  # same math, without the custom op's dispatch (~0.2 ms a call)
        return rw.emit(node, embedding_nf4, (ids, packed, absmax, g), "nf4 rows gathered, then dequantized")
    w = int_weight(rw.gm, wdq)
    if w is None or w.q.dim() != 2:
        return None
    v, d = w.q.shape
    s, z = (w.scale.float(), w.zero_point.float()) if w.group_size else w.per_row(v)
    if w.bits <= 4 and d % 2 == 0:
        codes, z, packed = pack_int4((w.q.int() - w.quant_min)), _zero_points(z - w.quant_min, torch.uint8), True
    else:
        codes, z, packed = w.q, _zero_points(z, w.q.dtype), False
    args = (ids, rw.const(codes, node, node.name, "codes", v * d), rw.const(s.contiguous(), node, node.name, "scales"),
            None if z is None else rw.const(z, node, node.name, "zero_points"), w.group_size or 0, packed)
    return rw.emit(node, embedding_int, args,
                   f"int{w.bits} rows gathered{' (packed 4-bit)' if packed else ''}, then dequantized")


RULES = RuleSet([
    # linear(x, dequantize(int / nf4 codes)) -> kernel on the stored codes (int8 / int4 / nf4 / dequantize)
    Rule("linear_weight_only", (_weight_only_linear,), rewrite=linear_weight_only),
    # embedding(dequantize(int / nf4 table), ids) -> gather the codes, then dequantize the rows
    Rule("embedding_weight_only", ("embedding",), rewrite=embedding_weight_only),
])


# -- specs (the backend's SpecMaker hook for mode="weight_only") ---------------------------------------
def weight_spec(w, row, node, embedding: str = "int8"):
    """int: signed [-2^(b-1), 2^(b-1)-1] when symmetric, unsigned [0, 2^b - 1] affine; nf4: NF4Spec.
    Embedding tables are 8-bit symmetric rows unless ``embedding="same"`` (X86Options.embedding_weights)."""
    if embedding not in ("int8", "same"):
        raise ConfigError(f"x86 embedding_weights must be 'int8' or 'same', got {embedding!r}")
    if row.name == "embedding_weight_only" and embedding == "int8":
        w = WeightSpec(bits=8, granularity="per_channel", symmetric=True, observer=w.observer)
    shape = _weight_shape(node.args[row.weight_arg])
    if w.granularity == "per_group" and shape is not None and shape[-1] % w.group_size:
        raise ConfigError(f"{node.name} ({module_path(node) or 'top'}): group_size={w.group_size} does not divide "
                          f"its input dimension {shape[-1]}; pick a divisor or exclude the module")
    if w.dtype == "nf4":
        return NF4Spec(group_size=w.group_size, double_quant=w.double_quant)
    gran = w.granularity
    return QuantSpec(dtype=torch.int8 if w.symmetric else torch.uint8, bits=w.bits, symmetric=w.symmetric,
                     granularity=gran, axis=0 if gran == "per_channel" else None,
                     group_size=w.group_size if gran == "per_group" else None, observer=w.observer)


def _weight_shape(node):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return tuple(get_attr_value(node.graph.owning_module, node).shape)
    return None
