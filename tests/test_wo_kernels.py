"""qcompile's weight-only int8 / int4 GEMV (csrc/wo_gemv.c): every ISA path this CPU can run against the
dequantized weight in fp64, odd shapes, affine and symmetric weights, the lowered model's report, and the
fallback to torch's kernels when the library is missing."""
import warnings

import pytest
import torch
from torch import nn

import qcompile
from qcompile import WeightSpec, kernels
from qcompile.qparams import sqnr

INFO = kernels.wo_kernel_info()
needs_kernel = pytest.mark.skipif(not INFO["available"], reason="the weight-only GEMV was not built here")


def _isas_of_this_cpu() -> list[int]:
    """The paths the kernel may take here: up to the one the library reports for this CPU (asked)."""
    top = {v: k for k, v in kernels.ISA_NAMES.items()}[INFO["isa"]]
    return list(range(top + 1))


def _close(y, ref):
    # fp32 products summed in another order than fp64: a few ulps of the largest output (|y| ~ sqrt(K) terms)
    return float((y.double() - ref).abs().max()) <= 2e-6 * float(ref.abs().max())


@needs_kernel
def test_the_library_reports_the_isa_the_cpu_has():
    flags = set(open("/proc/cpuinfo").read().split()) if __import__("os").path.exists("/proc/cpuinfo") else set()
    expect = "AVX-512" if {"avx512f", "avx512bw"} <= flags else "AVX2+FMA" if {"avx2", "fma"} <= flags else "scalar"
    assert INFO["isa"] == expect and INFO["max_rows"] == 16
    assert INFO["vnni"] == (expect == "AVX-512" and "avx512_vnni" in flags)  # vpdpwssd in the int16 bodies


@needs_kernel
@pytest.mark.parametrize("m,n,k", [(1, 37, 16), (3, 100, 272), (16, 33, 64), (5, 4, 128)])
@pytest.mark.parametrize("affine", [False, True])
def test_int8_every_isa_path_equals_the_dequantized_weight(m, n, k, affine):
    g = torch.Generator().manual_seed(m * 1000 + n)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 0.02 + 1e-3
    z = torch.randint(-5, 6, (n,), generator=g).float() if affine else torch.zeros(n)
    x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    ref = x.double() @ ((q.double() - z.double()[:, None]) * s.double()[:, None]).T + bias.double()
    for isa in _isas_of_this_cpu():
        y = kernels.wo_int8_linear(x, q, s, s * z if affine else None, bias, isa=isa)
        assert y.shape == (m, n) and _close(y, ref), kernels.ISA_NAMES[isa]


@needs_kernel
@pytest.mark.parametrize("m,n,k,group", [(1, 37, 32, 32), (3, 100, 256, 64), (16, 33, 256, 128),
                                         (1, 20, 512, 256), (2, 9, 96, 96), (4, 5, 400, 80), (1, 6, 48, 16)])
@pytest.mark.parametrize("affine", [False, True])
def test_int4_every_isa_path_equals_the_dequantized_weight(m, n, k, group, affine):
    g = torch.Generator().manual_seed(m * 1000 + n)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    packed = kernels.pack_int4_blocks(codes)
    assert torch.equal(kernels.unpack_int4_blocks(packed, k), codes) and packed.shape == (n, -(-k // 128) * 64)
    s = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    zero = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=g) if affine else None
    z = zero.double() if affine else torch.full((n, k // group), 8.0, dtype=torch.float64)
    w = (codes.double() - z.repeat_interleave(group, 1)) * s.double().repeat_interleave(group, 1)
    x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    ref = x.double() @ w.T + bias.double()
    for isa in _isas_of_this_cpu():
        for threads in (1, 2):
            y = kernels.wo_int4_linear(x, packed, group, s, zero, 8.0, bias, isa=isa, threads=threads)
            assert y.shape == (m, n) and _close(y, ref), (kernels.ISA_NAMES[isa], threads)


def _x_as_int16_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as the int16 bodies see it, in fp32 as the C file computes it: per 128-block amax, codes
    round_half_even(x * (32767 / amax)), scale amax / 32767."""
    xb = x.float().reshape(x.shape[0], -1, 128)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(32767.0) / amax, torch.tensor(0.0))
    return (torch.round(xb * inv).double() * (amax / 32767).double()).reshape(x.shape)


@needs_kernel
@pytest.mark.parametrize("m,n,k,group", [(1, 37, 128, 128), (3, 100, 512, 256), (16, 9, 256, 128), (5, 70, 384, 384)])
@pytest.mark.parametrize("affine", [False, True])
def test_int16_activation_bodies_sum_exactly_the_blockwise_int16_x(m, n, k, group, affine):
    """fast=True: x quantized per 128-block to int16, integer sums; every path of this CPU (VNNI and not)
    gives the dequantized weight times that x to fp32 rounding, and stays > 80 dB from the fp32 x result."""
    g = torch.Generator().manual_seed(n * 7 + m)
    x, bias = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 4, torch.randn(n, generator=g)
    x[0, :128] = 0  # an all-zero block (scale 0)
    xh = _x_as_int16_blocks(x)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    s8 = torch.rand(n, generator=g) * 0.02 + 1e-3
    z8 = torch.randint(-5, 6, (n,), generator=g).float() if affine else torch.zeros(n)
    w8 = (q.double() - z8.double()[:, None]) * s8.double()[:, None]
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    s4 = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    zero = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=g) if affine else None
    z4 = zero.double() if affine else torch.full((n, k // group), 8.0, dtype=torch.float64)
    w4 = (codes.double() - z4.repeat_interleave(group, 1)) * s4.double().repeat_interleave(group, 1)
    packed = kernels.pack_int4_blocks(codes)
    assert kernels.wo_int16_ok("int8", k) and kernels.wo_int16_ok("int4", k, group)
    assert not kernels.wo_int16_ok("int8", k + 16) and not kernels.wo_int16_ok("int4", k, 64)
    isas = _isas_of_this_cpu() + ([3] if INFO["vnni"] else [])
    for isa in isas:
        for threads in (1, 2):
            y8 = kernels.wo_int8_linear(x, q, s8, s8 * z8 if affine else None, bias, isa=isa, threads=threads,
                                        fast=True)
            y4 = kernels.wo_int4_linear(x, packed, group, s4, zero, 8.0, bias, isa=isa, threads=threads, fast=True)
            for y, w in ((y8, w8), (y4, w4)):
                # affine int8: the zero-point fix-up uses the fp32 sum of x (as the fp32 body)
                ref = xh @ w.T + bias.double() if not (affine and w is w8) else \
                    xh @ (q.double() * s8.double()[:, None]).T - x.double().sum(1, keepdim=True) * (s8 * z8).double() + bias.double()
                assert y.shape == (m, n) and _close(y, ref), (kernels.ISA_NAMES[isa], threads, w is w8)
                assert sqnr(x.double() @ w.T + bias.double(), y.double()) > 80


@needs_kernel
def test_threads_split_the_channels_without_changing_a_bit():
    g = torch.Generator().manual_seed(0)
    q, s = torch.randint(-128, 128, (1030, 256), dtype=torch.int8, generator=g), torch.rand(1030, generator=g)
    x = torch.randn(3, 256, generator=g)
    for fast in (False, True):
        one = kernels.wo_int8_linear(x, q, s, threads=1, fast=fast)
        assert torch.equal(one, kernels.wo_int8_linear(x, q, s, threads=2, fast=fast))
        assert torch.equal(one, kernels.wo_int8_linear(x, q, s, threads=3, fast=fast))


@needs_kernel
def test_the_kernels_decline_what_they_cannot_run():
    q, s = torch.zeros(8, 64, dtype=torch.int8), torch.ones(8)
    assert kernels.wo_int8_linear(torch.randn(INFO["max_rows"] + 1, 64), q, s) is None  # caller falls back
    with pytest.raises(ValueError, match="refused"):
        kernels.wo_int8_linear(torch.randn(1, 40), torch.zeros(8, 40, dtype=torch.int8), s)  # K % 16
    with pytest.raises(ValueError, match="refused"):
        kernels.wo_int4_linear(torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.uint8), 24, torch.ones(8, 4))
    with pytest.raises(ValueError, match="refused"):
        kernels.wo_int8_linear(torch.randn(1, 64), q, s, isa=7)


def _mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 96), nn.GELU(), nn.Linear(96, 40)).eval()  # 40: no multiple of 16
    for lin in (m[0], m[2]):
        nn.init.normal_(lin.weight, 0.0, 0.05)
    return m


def _compile(weights, x):
    return qcompile.compile(_mlp(), (x,), backend="x86", mode="weight_only", weights=weights)


@needs_kernel
@pytest.mark.parametrize("weights,kind", [(WeightSpec(bits=8), "int8"), (WeightSpec(bits=8, symmetric=False), "int8"),
                                          (WeightSpec(bits=4, group_size=32), "int4"),
                                          (WeightSpec(bits=4, group_size=32, symmetric=False), "int4")])
def test_lowered_model_names_the_gemv_and_matches_the_reference_graph(weights, kind):
    x1, x3, x40 = torch.randn(1, 256), torch.randn(3, 256), torch.randn(40, 256)  # 40 rows: above the GEMV's
    art = _compile(weights, x1)
    ks = {r.name: r.kernel for r in art.report.rows if r.kernel}
    want = f"qcompile {kind} GEMV ({INFO['isa']}"
    assert len(ks) == 2 and all(k.startswith(want) for k in ks.values()), ks
    with torch.no_grad():
        for x in (x1, x3, x40):
            assert sqnr(art.run_reference(x), art(x)) > 80  # fp32 throughout: the same math in another order


def test_without_the_library_torch_kernels_run_warn_and_the_report_says_so(monkeypatch):
    monkeypatch.setattr(kernels, "_lib", lambda: None)
    x = torch.randn(2, 256)
    for weights, torch_kernel in ((WeightSpec(bits=8), "aten._weight_int8pack_mm"),
                                  (WeightSpec(bits=4, group_size=128), "aten._weight_int4pack_mm_for_cpu")):
        m = nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 32)).eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            art = qcompile.compile(m, (x,), backend="x86", mode="weight_only", weights=weights)
        assert any("GEMV (csrc/wo_gemv.c) was not built" in str(w.message) for w in caught)
        ks = [r.kernel for r in art.report.rows if r.kernel]
        assert ks and all(k.startswith(torch_kernel) and "fallback: qcompile's GEMV not built" in k for k in ks)
        with torch.no_grad():
            assert sqnr(art.run_reference(x), art(x)) > 35  # torch's kernels take bf16 activations


@needs_kernel
@pytest.mark.parametrize("acts", ["bf16", "fp32"])
def test_int4_g128_names_the_activation_precision_it_runs(acts):
    m = nn.Sequential(nn.Linear(256, 64)).eval()
    x = torch.randn(1, 256)
    art = qcompile.compile(m, (x,), backend="x86", mode="weight_only", weights=WeightSpec(bits=4, group_size=128),
                           backend_options={"weight_only_activations": acts})
    (k,) = [r.kernel for r in art.report.rows if r.kernel]
    assert k.startswith("qcompile int4 GEMV") and (("int16 activations" in k) == (acts == "bf16"))
    assert ("fp32 activations" in k) == (acts == "fp32")
    with torch.no_grad():
        assert sqnr(art.run_reference(x), art(x)) > 80  # int16 x per 128-block: ~90 dB; fp32 x: more


@needs_kernel
def test_nf4_scales_decoded_in_c_equal_the_reference_bit_for_bit():
    from qcompile.lowbit import dequantize_scales_ref, double_quantize
    absmax = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 0.3 + 1e-3
    codes, step, offset = double_quantize(absmax, block=256)
    assert torch.equal(kernels.dequantize_scales(codes, step, offset, 256), dequantize_scales_ref(codes, step, offset, 256))


# -- bound calls (backends/x86/wo_gemv.py BoundGemv): constants resolved once when lowering ----------------
def _stack(k=256, n=128):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(k, n), nn.GELU(), nn.Linear(n, 64)).eval()


def _bound_objects(art):
    from qcompile.backends.x86.wo_gemv import BoundGemv
    return [v for v in vars(art.lowered.gm).values() if isinstance(v, BoundGemv)]


@needs_kernel
@pytest.mark.parametrize("weights", [WeightSpec(bits=8), WeightSpec(bits=8, symmetric=False),
                                     WeightSpec(bits=4, group_size=128), WeightSpec(bits=4, group_size=32, symmetric=False)])
@pytest.mark.parametrize("acts", ["bf16", "fp32"])
def test_bound_gemv_equals_the_unbound_call_bit_for_bit(weights, acts, monkeypatch):
    """The bound call is the same kernel on the same constants: outputs equal to the bit the unbound call's
    (binding switched off), for batch 1, 3-D inputs (15 rows: the GEMV on a view) and 40 rows (above the
    GEMV: the general path)."""
    opts = {"weight_only_activations": acts}
    for x, runs in (((torch.randn(1, 256)), (torch.randn(1, 256), torch.randn(40, 256))),
                    ((torch.randn(1, 5, 256)), (torch.randn(3, 5, 256), torch.randn(8, 5, 256)))):
        _bound_equals_plain(x, runs, weights, opts, monkeypatch)


def _bound_equals_plain(x, runs, weights, opts, monkeypatch):
    from qcompile.backends.x86 import weight_only
    bound = qcompile.compile(_stack(), (x,), backend="x86", mode="weight_only", weights=weights, backend_options=opts)
    assert len(_bound_objects(bound)) == 2
    assert "tree_flatten" not in bound.lowered.gm.code  # plain signature: one tensor in, one out
    with monkeypatch.context() as mp:
        mp.setattr(weight_only, "bind_gemvs", lambda gm, storage: None)
        plain = qcompile.compile(_stack(), (x,), backend="x86", mode="weight_only", weights=weights,
                                 backend_options=opts)
    assert not _bound_objects(plain)
    with torch.no_grad():
        for xi in runs:
            yb, yp = bound(xi), plain(xi)
            assert yb.shape == yp.shape == (*xi.shape[:-1], 64)
            assert torch.equal(yb, yp)
            assert sqnr(bound.run_reference(xi), yb) > 80
    # the report's storage lists the same tensors, roles and bytes through the bound objects
    rows = lambda a: sorted((r["tensor"], r["layer"], r["role"], r["bytes"], r["weights"]) for r in a.report.storage)
    assert rows(bound) == rows(plain)
    assert bound.report.sizes == plain.report.sizes


@needs_kernel
def test_bound_gemv_copies_and_keeps_its_numbers():
    import copy
    x = torch.randn(1, 256)
    art = qcompile.compile(_stack(), (x,), backend="x86", mode="weight_only", weights=WeightSpec(bits=4, group_size=128))
    gm2 = copy.deepcopy(art.lowered.gm)
    with torch.no_grad():
        assert torch.equal(gm2(x), art(x))
    # the copy holds its own tensors: overwriting them leaves the original's numbers alone
    for b in [v for v in vars(gm2).values() if hasattr(v, "stored_pieces")]:
        b.plan.consts[1].fill_(0.0)  # the scales
    with torch.no_grad():
        assert float(gm2(x).abs().max()) < float(art(x).abs().max())
        assert sqnr(art.run_reference(x), art(x)) > 80


def test_plain_signature_only_where_nothing_a_caller_sees_changes():
    """A dict output keeps the pytree codegen (the caller gets the dict); a tuple output becomes a plain tuple."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 32), nn.Linear(64, 16)

        def forward(self, x):
            return self.a(x), self.b(x)

    class Named(Two):
        def forward(self, x):
            return {"a": self.a(x), "b": self.b(x)}

    x = torch.randn(1, 64)
    for model, flat in ((Two().eval(), True), (Named().eval(), False)):
        art = qcompile.compile(model, (x,), backend="x86", mode="weight_only", weights=WeightSpec(bits=8))
        assert ("tree_flatten" not in art.lowered.gm.code) == flat
        with torch.no_grad():
            out, ref = art(x), art.run_reference(x)
        assert type(out) is type(ref) and (isinstance(out, tuple) or set(out) == {"a", "b"})
        for o, r in (zip(out, ref) if flat else ((out[k], ref[k]) for k in ref)):
            assert sqnr(r, o) > 80


# -- int4 rows interleaved by 4 (the int16 body's tiles) -------------------------------------------------
def test_int4_interleaved_packing_round_trips_and_refuses_what_it_cannot_hold():
    torch.manual_seed(5)
    for n, k in ((8, 256), (12, 200), (4, 16)):
        c = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        p4 = kernels.pack_int4_blocks(c, interleave=4)
        assert p4.shape == kernels.pack_int4_blocks(c).shape
        assert torch.equal(kernels.unpack_int4_blocks(p4, k, interleave=4), c)
        if n > 4:  # rows 0 and 1 share the tile's first 128 bytes: block 0 of row 0, then block 0 of row 1
            flat, plain = p4.flatten(), kernels.pack_int4_blocks(c)
            assert torch.equal(flat[:64], plain[0, :64]) and torch.equal(flat[64:128], plain[1, :64])
    with pytest.raises(ValueError, match="out_features % 4"):
        kernels.pack_int4_blocks(torch.zeros(6, 128, dtype=torch.uint8), interleave=4)


@needs_kernel
@pytest.mark.parametrize("m,n", [(1, 64), (3, 20), (16, 36)])
def test_int4_interleaved_rows_give_the_same_bits_on_every_isa_path(m, n):
    """The tiled body (4 rows a stream on AVX-512) and the one-row bodies reading the interleaved layout sum the
    same integers in the same order as the plain layout's: equal outputs, for each path this CPU runs."""
    torch.manual_seed(m + n)
    k, g = 384, 128
    c = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    s, z = torch.rand(n, k // g) + 0.1, torch.randint(0, 16, (n, k // g), dtype=torch.uint8)
    x = torch.randn(m, k)
    ref = x.double() @ ((c.double() - z.double().repeat_interleave(g, 1)) * s.double().repeat_interleave(g, 1)).T
    p1, p4 = kernels.pack_int4_blocks(c), kernels.pack_int4_blocks(c, interleave=4)
    top = 3 if INFO["vnni"] else {v: key for key, v in kernels.ISA_NAMES.items()}[INFO["isa"]]
    for isa in range(top + 1):
        y1 = kernels.wo_int4_linear(x, p1, g, s, z, fast=True, isa=isa)
        y4 = kernels.wo_int4_linear(x, p4, g, s, z, fast=True, isa=isa, interleave=4)
        assert torch.equal(y1, y4), isa
        assert float((y4.double() - ref).abs().max()) <= 1e-4 * float(ref.abs().max())  # int16 x: ~2^-16
    with pytest.raises(ValueError, match="int16-activation body only"):
        kernels.wo_int4_linear(x, p4, g, s, z, fast=False, interleave=4)


@needs_kernel
@pytest.mark.parametrize("n,tiled", [(64, True), (18, False)])
def test_lowered_int4_interleaves_where_out_features_allow(n, tiled):
    m = nn.Sequential(nn.Linear(256, n)).eval()
    x = torch.randn(1, 256)
    art = qcompile.compile(m, (x,), backend="x86", mode="weight_only", weights=WeightSpec(bits=4, group_size=128))
    (k,) = [r.kernel for r in art.report.rows if r.kernel]
    assert ("4 rows interleaved per block" in k) == tiled
    with torch.no_grad():
        for xi in (x, torch.randn(40, 256)):  # the GEMV, and above 16 rows the weight unpacked + fp32 GEMM
            assert sqnr(art.run_reference(xi), art(xi)) > 80


@needs_kernel
@pytest.mark.parametrize("m,n", [(1, 64), (5, 34), (16, 2)])
@pytest.mark.parametrize("affine", [False, True])
def test_int8_interleaved_rows_give_the_same_bits_on_every_isa_path(m, n, affine):
    """int8 codes with the rows of each tile of 2 interleaved per 128-element block (kernels.pack_int8_rows):
    the tiled body and the one-row bodies give the plain layout's outputs to the bit on every path."""
    torch.manual_seed(m * n)
    k = 384
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n) + 0.1
    fix = s * torch.randint(-3, 4, (n,)).float() if affine else None
    x = torch.randn(m, k)
    p2 = kernels.pack_int8_rows(q, 2)
    assert torch.equal(kernels.unpack_int8_rows(p2, 2), q)
    assert torch.equal(p2.flatten()[128:256], q[1, :128])  # row 1's first block follows row 0's
    top = 3 if INFO["vnni"] else {v: key for key, v in kernels.ISA_NAMES.items()}[INFO["isa"]]
    for isa in range(top + 1):
        y1 = kernels.wo_int8_linear(x, q, s, fix, fast=True, isa=isa)
        y2 = kernels.wo_int8_linear(x, p2, s, fix, fast=True, isa=isa, interleave=2)
        assert torch.equal(y1, y2), isa
    with pytest.raises(ValueError, match="int16-activation body only"):
        kernels.wo_int8_linear(x, p2, s, fix, fast=False, interleave=2)
    with pytest.raises(ValueError, match="out_features % 2"):
        kernels.pack_int8_rows(torch.zeros(3, 128, dtype=torch.int8), 2)


@needs_kernel
@pytest.mark.parametrize("k,chunked", [(256, True), (144, False)])
def test_int8_rows_17_to_32_run_where_the_report_says(k, chunked, monkeypatch):
    """With the int16 body (K % 128 == 0) 24 rows run as GEMV calls of 16 + 8; without it (K = 144) torch's
    int8-weight kernel runs them, and the report's kernel string says which."""
    m = nn.Sequential(nn.Linear(k, 64)).eval()
    art = qcompile.compile(m, (torch.randn(1, k),), backend="x86", mode="weight_only", weights=WeightSpec(bits=8))
    (note,) = [r.kernel for r in art.report.rows if r.kernel]
    assert ("up to 32 rows in calls of 16" in note) == chunked and ("aten._weight_int8pack_mm" in note) != chunked
    from qcompile.backends.x86 import weight_only
    calls = []
    real = weight_only.wo_int8_linear
    monkeypatch.setattr(weight_only, "wo_int8_linear", lambda x2, *a, **kw: calls.append(x2.shape[0]) or real(x2, *a, **kw))
    x = torch.randn(24, k)
    with torch.no_grad():
        y = art(x)
        assert sqnr(art.run_reference(x), y) > 40  # int16 x: ~90 dB; torch's kernel takes bf16 x
    assert calls == ([16, 8] if chunked else [])
