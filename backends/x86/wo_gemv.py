"""x86 weight-only linears on qcompile's own GEMV (csrc/wo_gemv.c, ``qcompile.kernels.wo_*``): int4 (and NF4
through its table) call targets, the int4 packing made when lowering, and the report / warning strings.
``weight_only.py`` picks between these and torch's kernels."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from qcompile import kernels as _kernels
from qcompile.int_weight import IntWeight
from qcompile.kernels import dequantize_scales, pack_int4_blocks, unpack_int4_blocks, wo_int4_linear, wo_kernel_info
from qcompile.lowbit import NF4_TABLE, dequantize_scales_ref, nf4_values

_INT4_GROUPS = (256, 128, 64, 32)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def int4_group(w: IntWeight) -> int | None:
    """The group size the int4 GEMV runs ``w`` with: its own, else the largest of 256 / 128 / 64 / 32 dividing K."""
    k = w.q.shape[1]
    return w.group_size or next((c for c in _INT4_GROUPS if k % c == 0), None)


def rows_interleave(kind: str, n: int, int16_body: bool) -> int:
    """Rows interleaved per block in the stored codes (``kernels.pack_int4_blocks`` / ``pack_int8_rows``): the
    int16-activation body reads tiles of 4 int4 / 2 int8 rows as one stream where out_features allows; else 1."""
    tile = 4 if kind == "int4" else 2
    return tile if int16_body and n % tile == 0 else 1


def _gemv_out(y, x):
    """A GEMV's fp32 [rows, N] result in ``x``'s leading shape and dtype (as is for 2-D fp32 ``x``: the Python
    around a batch-1 GEMV is part of its latency)."""
    if x.dim() == 2 and x.dtype is torch.float32:
        return y
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def linear_int4_gemv(x, packed, group_size: int, scale, zero, zconst: float, bias, fast: bool = False,
                     interleave: int = 1):
    """Codes in qcompile's block layout (``kernels.pack_int4_blocks``, rows interleaved by ``interleave``): its
    GEMV for <= 16 rows (``fast``: x as int16 per 128-block, the integer body), for more the weight dequantized
    once per call + fp32 GEMM (the GEMV re-reads cached weights per tile of 4 rows)."""
    y = wo_int4_linear(x if x.dim() == 2 else _rows(x), packed, group_size, scale, zero, zconst, bias, fast=fast,
                       interleave=interleave)
    if y is None:
        z = torch.full_like(scale, zconst) if zero is None else zero.float()
        w = (unpack_int4_blocks(packed, x.shape[-1], interleave).float() - z.repeat_interleave(group_size, 1)) * \
            scale.repeat_interleave(group_size, 1)
        return F.linear(x, w, bias)
    return _gemv_out(y, x)


def linear_nf4_gemv(x, blocks, absmax, group_size: int, bias):
    """NF4 codes in the int4 GEMV's block layout: its kernel with NF4's 16 values as the code table."""
    y = wo_int4_linear(x if x.dim() == 2 else _rows(x), blocks, group_size, absmax.reshape(blocks.shape[0], -1),
                       None, 0.0, bias, table=NF4_TABLE)
    if y is None:
        w = nf4_values(unpack_int4_blocks(blocks, x.shape[-1])) * absmax.reshape(blocks.shape[0], -1, 1).expand(
            -1, -1, group_size).reshape(blocks.shape[0], -1)
        return F.linear(x, w, bias)
    return _gemv_out(y, x)


def nf4_scales(codes, scale, offset, block: int):
    """NF4's double-quantized absmax decoded in C (``kernels.dequantize_scales``), else by torch."""
    out = dequantize_scales(codes, scale, offset, block)
    return dequantize_scales_ref(codes, scale, offset, block) if out is None else out


def wo_kernel_note(kind: str, fast: bool = False) -> tuple[str | None, str | None]:
    """(the report's kernel string for qcompile's int8 / int4 GEMV, None) when it is built; else (None, a
    warning naming the torch kernel that runs instead). ``fast``: the int16-activation body."""
    info = wo_kernel_info()
    if info["available"]:
        dp = "vpdpwssd" if info["vnni"] else "vpmaddwd" if info["isa"] != "scalar" else "int32 sums"
        how = (f"{info['isa']} {dp}, int16 activations per 128-block" if fast
               else f"{info['isa']}, fp32 activations")
        return (f"qcompile {kind} GEMV ({how}, codes decoded in registers) for <= "
                f"{info['max_rows']} rows"), None
    return None, (f"the {kind} weight-only GEMV (csrc/wo_gemv.c) was not built at install time (no C compiler "
                  f"or not an x86 CPU): torch's kernel runs instead, at about half of the memory bandwidth at "
                  f"batch 1; install qcompile with a C compiler")


def _warn_if_missing(node, kind: str) -> str:
    """Warns when qcompile's GEMV is missing and torch's kernel runs instead; the report's suffix then."""
    warning = wo_kernel_note(kind)[1]
    if warning is None:
        return ""
    warnings.warn(f"{node.name}: {warning}", stacklevel=3)
    return " [fallback: qcompile's GEMV not built]"


def _int4_gemv_pack(w: IntWeight, interleave: int = 1):
    """(packed [N, K/2], group size, scale fp32 [N, K/g], zero uint8 [N, K/g] or None, zero constant) for
    qcompile's int4 GEMV (codes q - quant_min in [0, 15]; zero z - quant_min; rows interleaved by ``interleave``
    where N allows it, see :func:`rows_interleave`), or the reason it cannot."""
    n, k = w.q.shape
    if w.bits > 4:
        return f"{w.bits}-bit values"
    g = int4_group(w)
    if g is None or g % 16 or k % g:
        return f"the int4 GEMV needs groups of a multiple of 16 dividing in_features={k} (got {g})"
    s, z = w.grouped(k, g)
    z = z - w.quant_min
    if not bool((z == z.round()).all()) or z.min() < 0 or z.max() > 255:
        return "zero points off the integer grid"
    codes = pack_int4_blocks((w.q.int() - w.quant_min).to(torch.uint8), interleave)
    const = bool((z == z.flatten()[0]).all())
    zero = None if const else z.to(torch.uint8).contiguous()
    return codes, g, s.float().contiguous(), zero, float(z.flatten()[0]) if const else 0.0


# -- bound calls: a lowered GEMV with its constants resolved once -------------------------------------
class BoundGemv:
    """One lowered int8 / int4 GEMV linear whose constants (codes, scales, zero points, bias) are bound when
    lowering: the graph reads one plain attribute and calls :func:`bound_gemv`, which makes the call of its
    ``qcompile.kernels.WoPlan`` (the one ``wo_int8_linear`` / ``wo_int4_linear`` would make) with the constants'
    pointers taken once. A batch-1 GEMV streams its weight from DRAM and leaves the caches
    cold for the Python around the next call, so every attribute lookup and helper call on that path is
    visible in its latency: the unbound call (``linear_int8_weight`` / ``linear_int4_gemv`` with the
    constants as get_attr nodes) spent ~90 us cold before the first GEMV, of a ~600 us int8 call at 4096 x 4096.

    The fast path takes a contiguous fp32 ``x`` of at most ``max_rows`` rows; anything else runs ``general``
    (the unbound call, same numbers). ``pieces``: (name, tensor, role, weights) of the bound constants, for the
    report's storage rows (``qcompile.report.storage_rows`` asks ``stored_pieces``)."""

    __slots__ = ("plan", "n", "k", "max_rows", "general", "general_args", "pieces", "_fn", "_args")

    def __init__(self, plan: "_kernels.WoPlan", n: int, k: int, general, general_args: tuple, pieces: tuple):
        self.plan, self.n, self.k, self.general, self.general_args, self.pieces = plan, n, k, general, general_args, pieces
        lib = _kernels._lib()
        self.max_rows = _kernels._wo_info(lib)["max_rows"]
        self._fn = getattr(lib, plan.fn)
        self._args = plan.args()  # pointers of the tensors the plan holds (it keeps them alive; never resized)

    def __reduce__(self):  # copy / deepcopy: rebuilt from the tensors (a ctypes function is not copyable)
        return (BoundGemv, (self.plan, self.n, self.k, self.general, self.general_args, self.pieces))

    def stored_pieces(self, name: str):
        return iter(self.pieces)  # named as the lowering named them, not after this object's attribute


def bound_gemv(x, g: BoundGemv):
    """Run a :class:`BoundGemv` on ``x`` [..., K]."""
    if x.dtype is _F32 and x.is_contiguous():
        x2 = x if x.dim() == 2 else x.view(-1, g.k)
        m = x2.shape[0]
        if 0 < m <= g.max_rows:
            y = torch.empty(m, g.n, dtype=_F32)
            if g._fn(x2.data_ptr(), *g._args, y.data_ptr(), m, g.n, g.k, *g.plan.tail,
                     _kernels.wo_threads(g.plan.nbytes)) == 0:
                return y if x.dim() == 2 else y.view(*x.shape[:-1], g.n)
    return g.general(x, *g.general_args)


_F32 = torch.float32
