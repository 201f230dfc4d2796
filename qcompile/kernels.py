"""Kernels qcompile compiles itself (csrc/), loaded with ctypes; each has a pure-torch fallback.

``nf4_linear`` runs the NF4 weight-only linear without materialising the fp32 weight (see
``csrc/nf4_kernel.c``). The shared library is built at install time (``setup.py``); when it is missing
(no compiler at install time) :func:`nf4_kernel_info` says so and the x86 backend falls back to
dequantize + fp32 GEMM, which the report and a compile-time warning name.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
import importlib.util
from functools import lru_cache

import torch

ISA_NAMES = {3: "AVX-512 VNNI", 2: "AVX-512", 1: "AVX2+FMA", 0: "scalar"}  # 3: the int16 GEMV bodies only

# Threads of qcompile's own kernels. One, the calling thread: torch's OpenMP workers keep spinning for a
# while after each parallel op, and threads of ours compete with them for the same cores. Measured on 2 cores:
# the d=384 x 6 encoder (batch 8 x 128) 68 ms with 2 kernel threads, 52 ms with 1; 4 x Linear(4096) NF4
# batch 1 8.7 ms with 2, 7.6 ms with 1. None: torch.get_num_threads().
KERNEL_THREADS: int | None = 1
# The weight-only GEMV (csrc/wo_gemv.c) is the exception, by weight size: a batch-1 linear on a big weight
# streams it from DRAM, and one core cannot reach the memory limit (one core read 11-15 GB/s of int8 weight
# where two read 21-29, the Zen 4), so a weight of WO_PARALLEL_BYTES or more is split over
# torch.get_num_threads() threads. They are torch's own OpenMP team (the C file is built with -fopenmp and
# resolves to the libgomp torch loaded), so nothing competes with torch's workers; a parallel region costs a
# few microseconds when they are spinning, more when they sleep. 2 MiB (~100 us of DRAM traffic on two
# cores) keeps that cost small. bench/bench_linear.py measures both (its "1 kernel thread" rows).
WO_PARALLEL_BYTES = 2 << 20
# The batched int8 matmul (csrc/int8_bmm.c) splits its batch slices over torch.get_num_threads() threads (torch's
# OpenMP team, as the GEMV) from this many multiply-adds per call (~40 us on one Zen 4 core); smaller calls stay
# on the calling thread, where a parallel region's start would be a visible share of the call.
BMM_PARALLEL_MACS = 4 << 20


@lru_cache(maxsize=1)
def _lib():
    spec = importlib.util.find_spec("qcompile._nf4")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qc_nf4_linear.argtypes = [p, p, p, p, p, i64, i64, i64, i64, c_int, c_int]
    lib.qc_nf4_linear.restype = c_int
    lib.qc_nf4_isa.restype = c_int
    lib.qc_nf4_max_rows.restype = c_int
    if hasattr(lib, "qc_u8_bmm"):
        lib.qc_u8_bmm.argtypes = [p, p, i64, i64, p, p, i64, i64, p, i64, i64, i64, i64, ctypes.c_int32,
                                  ctypes.c_int32, ctypes.c_float, ctypes.c_int32, c_int]
        lib.qc_u8_bmm.restype = c_int
        lib.qc_bmm_isa.restype = c_int
    if hasattr(lib, "qc_u8_bmm_f32"):
        lib.qc_u8_bmm_f32.argtypes = [p, p, i64, i64, p, p, i64, i64, p, i64, i64, i64, i64, ctypes.c_int32,
                                      ctypes.c_int32, ctypes.c_float, c_int]
        lib.qc_u8_bmm_f32.restype = c_int
    if hasattr(lib, "qc_wo_int8_linear"):
        lib.qc_wo_int8_linear.argtypes = [p, p, p, p, p, p, i64, i64, i64, c_int, c_int]
        lib.qc_wo_int8_linear.restype = c_int
        lib.qc_wo_int4_linear.argtypes = [p, p, p, p, ctypes.c_float, p, p, p, i64, i64, i64, i64, c_int, c_int]
        lib.qc_wo_int4_linear.restype = c_int
        lib.qc_wo_isa.restype = c_int
        lib.qc_wo_int8_linear_i16_il.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, c_int, c_int]
        lib.qc_wo_int8_linear_i16_il.restype = c_int
        lib.qc_wo_int4_linear_i16_il.argtypes = [p, p, p, p, ctypes.c_float, p, p, i64, i64, i64, i64, i64, c_int,
                                                 c_int]
        lib.qc_wo_int4_linear_i16_il.restype = c_int
        lib.qc_wo_vnni.restype = c_int
        lib.qc_wo_dequantize_scales.argtypes = [p, p, p, p, i64, i64]
        lib.qc_wo_dequantize_scales.restype = None
        lib.qc_wo_max_rows.restype = c_int
    if hasattr(lib, "qc_dependent_adds"):
        lib.qc_dependent_adds.argtypes = [i64]
        lib.qc_dependent_adds.restype = i64
    return lib


def nf4_kernel_info() -> dict:
    """``{"available": bool, "isa": "AVX-512" | "AVX2+FMA" | "scalar" | None, "max_rows": int}``."""
    lib = _lib()
    if lib is None:
        return {"available": False, "isa": None, "max_rows": 0}
    return {"available": True, "isa": ISA_NAMES[lib.qc_nf4_isa()], "max_rows": lib.qc_nf4_max_rows()}


def nf4_linear(x2: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, isa: int | None = None) -> torch.Tensor | None:
    """``x2 [M, K] @ NF4(packed, absmax)^T (+ bias)`` with the C kernel; None when it cannot run it
    (library missing, too many rows, a group size not a multiple of 16): the caller falls back."""
    lib = _lib()
    m, k = x2.shape
    if lib is None or m > lib.qc_nf4_max_rows() or group_size % 16 or k % group_size:
        return None
    x2 = x2.detach().float().contiguous()
    packed, absmax = packed.contiguous(), absmax.detach().float().contiguous()
    b = None if bias is None else bias.detach().float().contiguous()
    n = packed.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    rc = lib.qc_nf4_linear(x2.data_ptr(), packed.data_ptr(), absmax.data_ptr(), 0 if b is None else b.data_ptr(),
                           y.data_ptr(), m, n, k, group_size, lib.qc_nf4_isa() if isa is None else isa,
                           KERNEL_THREADS or torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"nf4 kernel refused shapes x {tuple(x2.shape)}, packed {tuple(packed.shape)}, "
                         f"group_size {group_size}, isa {isa}")
    return y


# -- weight-only int8 / int4 GEMV (csrc/wo_gemv.c) ----------------------------------------------------
def wo_kernel_info() -> dict:
    """``{"available": bool, "isa": "AVX-512" | "AVX2+FMA" | "scalar" | None, "max_rows": int}`` of the
    weight-only int8 / int4 kernels."""
    return _wo_info(_lib())


@lru_cache(maxsize=4)
def _wo_info(lib) -> dict:
    """wo_kernel_info of one loaded library (asked once: the GEMV's Python side runs per call, and a
    DRAM-streaming call leaves the caches cold for it)."""
    if lib is None or not hasattr(lib, "qc_wo_int8_linear"):
        return {"available": False, "isa": None, "max_rows": 0}
    return {"available": True, "isa": ISA_NAMES[lib.qc_wo_isa()], "max_rows": lib.qc_wo_max_rows(),
            "vnni": bool(lib.qc_wo_vnni()), "isa_id": lib.qc_wo_isa()}


def wo_int16_ok(kind: str, k: int, group_size: int | None = None) -> bool:
    """True when the int16-activation body (``fast=True``) takes this shape: int8 with K % 128 == 0, int4 with
    uniform codes and group_size % 128 == 0."""
    return wo_kernel_info()["available"] and _int16_shape(kind, k, group_size)


def _int16_shape(kind: str, k: int, group_size: int | None = None) -> bool:
    """wo_int16_ok's shape rule alone (the calls below have checked the library already)."""
    return k % 128 == 0 if kind == "int8" else group_size is not None and group_size % 128 == 0 and k % group_size == 0


def kernel_threads(work: int, parallel_from: int) -> int:
    """Threads for one call of qcompile's kernels: KERNEL_THREADS, or, when that is 1, all of torch's for a call
    of at least ``parallel_from`` units of work (WO_PARALLEL_BYTES of weight, BMM_PARALLEL_MACS multiply-adds)."""
    if KERNEL_THREADS is None:
        return torch.get_num_threads()
    return torch.get_num_threads() if KERNEL_THREADS == 1 and work >= parallel_from else KERNEL_THREADS


def wo_threads(weight_bytes: int) -> int:
    """Threads for one weight-only GEMV call (see WO_PARALLEL_BYTES)."""
    return kernel_threads(weight_bytes, WO_PARALLEL_BYTES)


def pack_int4_blocks(codes: torch.Tensor, interleave: int = 1) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 15] (K % 16 == 0) -> uint8 [N, 64 * ceil(K / 128)] in the GEMV's layout:
    blocks of 128 elements as 16 little-endian int32 words, bits 4i..4i+3 of word d = element 16 i + d (one
    shift gives 16 consecutive codes in 16 lanes); the last block zero-padded. ``interleave=4`` (N % 4 == 0):
    the rows of each tile of 4 interleaved block by block (row n's block b at byte ``(n - n % 4) RB + (n % 4 +
    4 b) 64`` of the flat buffer), the layout the int16-activation body reads 4 rows at a time in one stream."""
    n, k = codes.shape
    blocks = -(-k // 128)
    c = torch.zeros(n, blocks * 128, dtype=torch.int32)
    c[:, :k] = codes.to(torch.int32)
    c = c.reshape(n, blocks, 8, 16)
    words = torch.zeros(n, blocks, 16, dtype=torch.int32)
    for i in range(8):
        words |= c[:, :, i] << (4 * i)
    words = _interleave_rows(words, interleave)
    return words.reshape(n, blocks * 16).view(torch.uint8).contiguous()


def _interleave_rows(words: torch.Tensor, interleave: int, inverse: bool = False) -> torch.Tensor:
    """[N, blocks, 16] int32 words <-> their tile-of-``interleave``-rows order (see pack_int4_blocks)."""
    if interleave == 1:
        return words
    n, blocks = words.shape[:2]
    if interleave != 4 or n % 4:
        raise ValueError(f"int4 rows interleave by 1 or by 4 with out_features % 4 == 0 (got {interleave}, {n} rows)")
    if inverse:  # stored [N/4, blocks, 4, 16] in the [N, blocks, 16] shape -> row order
        return words.reshape(n // 4, blocks, 4, 16).permute(0, 2, 1, 3).reshape(n, blocks, 16)
    return words.reshape(n // 4, 4, blocks, 16).permute(0, 2, 1, 3).reshape(n, blocks, 16)


def pack_int8_rows(q8: torch.Tensor, interleave: int = 1) -> torch.Tensor:
    """int8 codes [N, K] (K % 128 == 0) with the rows of each tile of ``interleave`` (1 or 2, N % 2 == 0)
    interleaved per 128-element block: row n's block b at element ``(n - n % 2) K + (n % 2 + 2 b) 128`` of the
    flat buffer, kept in the [N, K] shape. The int16-activation GEMV reads a tile of 2 rows as one stream."""
    if interleave == 1:
        return q8.contiguous()
    n, k = q8.shape
    if interleave != 2 or n % 2 or k % 128:
        raise ValueError(f"int8 rows interleave by 1 or by 2 with out_features % 2 == 0 and in_features % 128 == 0 "
                         f"(got {interleave}, {tuple(q8.shape)})")
    return q8.reshape(n // 2, 2, k // 128, 128).transpose(1, 2).reshape(n, k).contiguous()


def unpack_int8_rows(packed: torch.Tensor, interleave: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int8_rows`: row-major int8 codes [N, K]."""
    if interleave == 1:
        return packed
    n, k = packed.shape
    return packed.reshape(n // 2, k // 128, 2, 128).transpose(1, 2).reshape(n, k).contiguous()


def unpack_int4_blocks(packed: torch.Tensor, k: int, interleave: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int4_blocks`: -> uint8 codes [N, K]."""
    n = packed.shape[0]
    words = _interleave_rows(packed.contiguous().view(torch.int32).reshape(n, -1, 16), interleave, inverse=True)
    codes = (words.reshape(n, -1, 1, 16) >> (4 * torch.arange(8).reshape(1, 1, 8, 1))) & 15
    return codes.reshape(n, -1)[:, :k].to(torch.uint8)


def dequantize_scales(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, block: int):
    """``lowbit.dequantize_scales_ref`` (NF4's double-quantized absmax) in C on the calling thread, the same
    fp32 values; None without the library."""
    lib = _lib()
    if lib is None or not hasattr(lib, "qc_wo_dequantize_scales"):
        return None
    c = codes.contiguous()
    s, o = scale.detach().float().contiguous(), offset.detach().float().contiguous()
    if c.dtype != torch.uint8 or s.numel() * block < c.numel() or o.numel() != s.numel():
        return None
    out = torch.empty(c.shape, dtype=torch.float32)
    lib.qc_wo_dequantize_scales(c.data_ptr(), s.data_ptr(), o.data_ptr(), out.data_ptr(), c.numel(), block)
    return out


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _f32(t):
    """``t`` as contiguous fp32 for the C kernels: the tensor itself when it already is. The GEMVs' Python side
    runs with caches a weight stream has just flushed, so every torch call it skips is measurable."""
    if t is None or (t.dtype is torch.float32 and t.is_contiguous()):
        return t
    return t.detach().float().contiguous()


def _contiguous(t):
    return t if t is None or t.is_contiguous() else t.contiguous()


def _wo_ready(x2: torch.Tensor):
    lib = _lib()
    info = _wo_info(lib)
    if not info["available"] or x2.shape[0] > info["max_rows"]:
        return None, None
    return lib, _f32(x2)


def _wo_isa(lib, fast: bool) -> int:
    """The best path of this CPU: for the int16 bodies 3 (AVX-512 VNNI, vpdpwssd) where it has VNNI."""
    info = _wo_info(lib)
    return 3 if fast and info["vnni"] else info["isa_id"]


@dataclass(frozen=True)
class WoPlan:
    """One weight-only GEMV call, everything but x, y and their shapes: ``fn(x, *consts, y, M, N, K, *tail,
    threads)`` with the library's entry point ``fn``. ``consts`` are tensors (passed as pointers, already fp32 /
    uint8 and contiguous), None (NULL) or floats; ``nbytes`` the weight bytes that set the thread count.
    :func:`wo_int8_linear` / :func:`wo_int4_linear` run one per call; the x86 backend binds one per layer."""
    fn: str
    consts: tuple
    tail: tuple
    nbytes: int

    def args(self) -> tuple:
        return tuple(c.data_ptr() if isinstance(c, torch.Tensor) else c for c in self.consts)


def wo_plan(kind: str, k: int, codes, scale, fix_or_zero=None, bias=None, *, fast: bool = False,
            interleave: int = 1, group_size: int = 0, zconst: float = 0.0, table=None,
            isa: int | None = None) -> WoPlan:
    """The call :func:`wo_int8_linear` (``kind="int8"``, ``fix_or_zero`` = the affine fix-up) or
    :func:`wo_int4_linear` (``"int4"``, ``fix_or_zero`` = the zero points) makes for these constants."""
    lib = _lib()
    if kind == "int8":
        fast = fast and _int16_shape("int8", k)
        need = "in_features % 128 == 0"
        consts = (_contiguous(codes), _f32(scale), _f32(fix_or_zero), _f32(bias))
        fn, tail = ("qc_wo_int8_linear_i16_il", (interleave,)) if fast else ("qc_wo_int8_linear", ())
    else:
        fast = fast and table is None and _int16_shape("int4", k, group_size)
        need = "uniform codes, group_size % 128 == 0"
        zero = fix_or_zero
        zero = None if zero is None else _contiguous(zero if zero.dtype is torch.uint8 else zero.to(torch.uint8))
        if fast:
            fn, tail = "qc_wo_int4_linear_i16_il", (group_size, interleave)
            consts = (_contiguous(codes), _f32(scale), zero, float(zconst), _f32(bias))
        else:
            fn, tail = "qc_wo_int4_linear", (group_size,)
            consts = (_contiguous(codes), _f32(scale), zero, float(zconst), _f32(table), _f32(bias))
    if interleave != 1 and not fast:
        raise ValueError(f"{kind} GEMV: rows interleaved by {interleave} are read by the int16-activation body only "
                         f"(fast=True, {need}); got in_features {k}, group_size {group_size}")
    return WoPlan(fn, consts, tail + (_wo_isa(lib, fast) if isa is None else isa,), codes.numel())


def _wo_run(lib, plan: WoPlan, x2, n: int, threads: int | None, what: str):
    (m, k) = x2.shape
    y = torch.empty(m, n, dtype=torch.float32)
    rc = getattr(lib, plan.fn)(x2.data_ptr(), *plan.args(), y.data_ptr(), m, n, k, *plan.tail,
                               threads or wo_threads(plan.nbytes))
    if rc != 0:
        raise ValueError(f"{what} weight-only kernel refused x {tuple(x2.shape)}, {n} outputs, call {plan.fn} "
                         f"{plan.tail}")
    return y


def wo_int8_linear(x2, q8, scale, fix=None, bias=None, isa: int | None = None, threads: int | None = None,
                   fast: bool = False, interleave: int = 1):
    """``x2 [M, K] @ ((q8 - z) * scale)^T (+ bias)`` with ``fix = scale * z`` (None: symmetric); None when
    the kernel cannot run it (library missing, more rows than it takes): the caller falls back. ``fast``: x as
    int16 per 128-block and integer sums (where :func:`wo_int16_ok`; relative error <= 2^-16 of a block's
    largest |x|), else fp32 x and fp32 sums. ``interleave``: the :func:`pack_int8_rows` interleave of ``q8``
    (2: the int16 body only)."""
    lib, x2 = _wo_ready(x2)
    if lib is None:
        return None
    plan = wo_plan("int8", x2.shape[1], q8, scale, fix, bias, fast=fast, interleave=interleave, isa=isa)
    return _wo_run(lib, plan, x2, q8.shape[0], threads, "int8")


def wo_int4_linear(x2, packed, group_size: int, scale, zero=None, zconst: float = 8.0, bias=None,
                   isa: int | None = None, threads: int | None = None, table: torch.Tensor | None = None,
                   fast: bool = False, interleave: int = 1):
    """``x2 [M, K] @ W^T (+ bias)``, ``W = (v[code] - z) * scale`` per group, codes packed by
    :func:`pack_int4_blocks`, z from ``zero`` (uint8 [N, K/g]) or ``zconst``, v = 0..15 or the 16 values of
    ``table`` (NF4: its table, z = 0); None when it cannot run. ``fast``: x as int16 per 128-block and integer
    sums, where :func:`wo_int16_ok` and ``table`` is None (uniform codes); else fp32 x and fp32 sums.
    ``interleave``: the ``pack_int4_blocks`` interleave of ``packed`` (4: the int16 body only)."""
    lib, x2 = _wo_ready(x2)
    if lib is None:
        return None
    k = x2.shape[1]
    if packed.shape[1] != -(-k // 128) * 64:
        raise ValueError(f"int4 GEMV: packed {tuple(packed.shape)} is not pack_int4_blocks of K={k}")
    plan = wo_plan("int4", k, packed, scale, zero, bias, fast=fast, interleave=interleave, group_size=group_size,
                   zconst=zconst, table=table, isa=isa)
    return _wo_run(lib, plan, x2, packed.shape[0], threads, "int4")


def measured_clock_hz(iterations: int = 20_000_000, repeats: int = 5) -> float | None:
    """The clock one core runs at, measured: a chain of dependent adds (1 cycle each, csrc/nf4_kernel.c)
    timed ``repeats`` times, fastest kept (a preempted run is only ever slower). None without the extension."""
    import time
    lib = _lib()
    if lib is None or not hasattr(lib, "qc_dependent_adds") or lib.qc_dependent_adds(1000) < 0:
        return None
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        lib.qc_dependent_adds(iterations)
        best = min(best, time.perf_counter() - t0)
    return 8 * iterations / best





def u8_bmm_available() -> bool:
    """True when the batched uint8 matmul kernel (csrc/int8_bmm.c) is built and this CPU has AVX-512 VNNI."""
    lib = _lib()
    return lib is not None and hasattr(lib, "qc_u8_bmm") and bool(lib.qc_bmm_isa())


def _batch_offsets(t: torch.Tensor):
    """Element offset of every [..., M, K] slice of ``t`` (any strides), as a ctypes int64 array."""
    offsets = [t.storage_offset()]
    for size, stride in zip(t.shape[:-2], t.stride()[:-2]):
        offsets = [o + i * stride for o in offsets for i in range(size)]
    return (ctypes.c_int64 * len(offsets))(*offsets), len(offsets)


def u8_bmm(a: torch.Tensor, b: torch.Tensor, scale: float | None, zero_point: int = 0) -> torch.Tensor | None:
    """quint8 ``a [..., M, K] @ b [..., K, N]`` requantized to quint8 (scale, zero_point) by the VNNI kernel,
    or (``scale=None``) as fp32 ``(a - za) @ (b - zb) * scale_a * scale_b``, reading both operands in place
    (any strides); None where the kernel cannot run (the caller falls back)."""
    f32 = scale is None
    if not u8_bmm_available() or a.dtype != torch.quint8 or b.dtype != torch.quint8 or a.shape[:-2] != b.shape[:-2] \
            or (f32 and not hasattr(_lib(), "qc_u8_bmm_f32")):
        return None
    *batch, m, k = a.shape
    n = b.shape[-1]
    (a_off, batches), (b_off, _) = _batch_offsets(a), _batch_offsets(b)
    out = torch.empty(*batch, m, n, dtype=torch.float32 if f32 else torch.uint8)
    mult = a.q_scale() * b.q_scale() / (1.0 if f32 else scale)
    base_a = a.data_ptr() - a.storage_offset()  # data_ptr points at the first element; offsets include it
    base_b = b.data_ptr() - b.storage_offset()
    operands = (base_a, a_off, a.stride(-2), a.stride(-1), base_b, b_off, b.stride(-2), b.stride(-1), out.data_ptr(),
                batches, m, k, n, a.q_zero_point(), b.q_zero_point(), mult)
    threads = kernel_threads(batches * m * k * n, BMM_PARALLEL_MACS)
    if f32:
        status = _lib().qc_u8_bmm_f32(*operands, threads)
    else:
        status = _lib().qc_u8_bmm(*operands, int(zero_point), threads)
    if status != 0:
        return None
    return out if f32 else torch._make_per_tensor_quantized_tensor(out, scale, int(zero_point))
