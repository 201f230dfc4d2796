"""qcompile's NF4 kernel (csrc/nf4_kernel.c): every ISA path this CPU can run against the reference
dequantize, the lowered linear against the reference graph, and the fallback when the kernel is missing."""
import warnings

import pytest
import torch
from torch import nn

import qcompile
from qcompile import WeightSpec, kernels
from qcompile.lowbit import dequantize_nf4, nf4_params, nf4_quantize, pack_int4
from qcompile.qparams import sqnr

INFO = kernels.nf4_kernel_info()
needs_kernel = pytest.mark.skipif(not INFO["available"], reason="the NF4 kernel was not built on this machine")


def _weight(n=96, k=256, g=64, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    p = nf4_params(w, g)
    packed = pack_int4(nf4_quantize(w, p))
    return packed, p.absmax, dequantize_nf4(packed, p.absmax, g)


def _isas_of_this_cpu() -> list[int]:
    """The paths the kernel may take here: up to the one the CPU reports (asked, never assumed)."""
    top = {v: k for k, v in kernels.ISA_NAMES.items()}[INFO["isa"]]
    return list(range(top + 1))


@needs_kernel
def test_kernel_isa_matches_what_the_cpu_reports():
    cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    flags = open("/proc/cpuinfo").read().split() if __import__("os").path.exists("/proc/cpuinfo") else []
    if "avx512f" in flags and "avx512bw" in flags:
        assert INFO["isa"] == "AVX-512"
    elif "avx2" in flags and "fma" in flags:
        assert INFO["isa"] == "AVX2+FMA"
    else:
        assert INFO["isa"] == "scalar", cap


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 16])
@pytest.mark.parametrize("group_size", [16, 64, 128])
def test_every_isa_path_equals_the_reference_dequantize(rows, group_size):
    packed, absmax, w = _weight(g=group_size)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(96)
    ref = x @ w.T + bias
    for isa in _isas_of_this_cpu():
        y = kernels.nf4_linear(x, packed, absmax, group_size, bias, isa=isa)
        # fp32 sums in another order: within a few ulps of the output scale
        assert (y - ref).abs().max() <= 1e-5 * ref.abs().max(), kernels.ISA_NAMES[isa]


@needs_kernel
def test_kernel_declines_what_it_cannot_run():
    packed, absmax, _ = _weight(g=64)
    assert kernels.nf4_linear(torch.randn(INFO["max_rows"] + 1, 256), packed, absmax, 64) is None
    with pytest.raises(ValueError, match="refused"):
        kernels.nf4_linear(torch.randn(2, 256), packed, absmax, 64, isa=7)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).eval()


@needs_kernel
def test_lowered_nf4_uses_the_kernel_and_matches_the_reference_graph():
    m = _mlp()
    x1, x32 = torch.randn(1, 256), torch.randn(32, 256)  # 1 row: the kernel; 32 rows: dequantize + GEMM
    art = qcompile.compile(m, (x1,), backend="x86", mode="weight_only", weights=WeightSpec(dtype="nf4", group_size=64))
    assert all("qcompile LUT-decode kernel" in r.kernel for r in art.report.rows if "linear" in r.op)
    with torch.no_grad():
        for x in (x1, x32):
            assert sqnr(art.run_reference(x), art(x)) > 100  # the same fp32 math in another order


def test_without_the_kernel_nf4_falls_back_warns_and_says_why(monkeypatch):
    monkeypatch.setattr(kernels, "_lib", lambda: None)
    m = _mlp()
    x = torch.randn(2, 256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        art = qcompile.compile(m, (x,), backend="x86", mode="weight_only",
                               weights=WeightSpec(dtype="nf4", group_size=64))
    assert any("NF4 on this CPU runs without its kernel" in str(w.message) for w in caught)
    ks = [r.kernel for r in art.report.rows if "linear" in r.op]
    assert ks and all("dequantized to fp32 at every call" in k and "not built" in k for k in ks)
    with torch.no_grad():
        assert sqnr(art.run_reference(x), art(x)) > 100


def test_the_clock_probe_measures_a_plausible_clock():
    """bench/_timing's int8 peak uses the measured clock: a dependent-add chain timed (csrc/nf4_kernel.c)."""
    from qcompile.kernels import measured_clock_hz, nf4_kernel_info
    hz = measured_clock_hz(iterations=2_000_000, repeats=3)
    if not nf4_kernel_info()["available"]:
        assert hz is None
        return
    assert 0.5e9 < hz < 7e9  # any x86 core this project meets runs between these
