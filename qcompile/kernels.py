"""Kernels qcompile compiles itself (csrc/), loaded with ctypes; each has a pure-torch fallback.

``nf4_linear`` runs the NF4 weight-only linear without materialising the fp32 weight (see
``csrc/nf4_kernel.c``). The shared library is built at install time (``setup.py``); when it is missing
(no compiler at install time) :func:`nf4_kernel_info` says so and the x86 backend falls back to
dequantize + fp32 GEMM, which the report and a compile-time warning name.
"""
from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache

import torch

ISA_NAMES = {2: "AVX-512", 1: "AVX2+FMA", 0: "scalar"}


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
                           torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"nf4 kernel refused shapes x {tuple(x2.shape)}, packed {tuple(packed.shape)}, "
                         f"group_size {group_size}, isa {isa}")
    return y


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
