"""Weight-only mode on x86: int8 / int4 group-wise / NF4 weights, their kernels and stored bytes."""
import os

import pytest
import torch
from torch import nn

import qcompile
from qcompile.kernels import nf4_kernel_info, wo_kernel_info
from qcompile import WeightSpec
from qcompile.errors import ConfigError
from qcompile.gptq import NF4Grid, UniformGrid, rtn
from qcompile.lowbit import (NF4_TABLE, dequantize_scales_ref, double_quantize, nf4_codes, nf4_params, pack_int4,
                             unpack_int4)
from qcompile.qparams import sqnr
from qcompile.specs import NF4Spec, QuantSpec


def mlp(d_in=256, hidden=512, d_out=128, seed=0):
    """Gaussian weights like trained layers (nn.Linear's default init is uniform, which flatters int grids)."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out)).eval()
    for lin in (m[0], m[2]):
        nn.init.normal_(lin.weight, 0.0, 0.05)
    return m


X = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
X_MANY = torch.randn(48, 256, generator=torch.Generator().manual_seed(2))  # above the int8 kernel's row limit


BF16_DB = 40  # lowered vs reference: the kernels take bf16 activations and scales by default (43-47 dB measured)


def compile_wo(model, weights, x=X, **kw):
    return qcompile.compile(model, (x,), backend="x86", mode="weight_only", weights=weights, **kw)


def kernels(art):
    return {r.name: r.kernel for r in art.report.rows if r.kernel}


# -- formats -----------------------------------------------------------------------------------
def test_int4_packing_roundtrip_and_layout():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (8, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)  # element 2i in the low nibble


def test_nf4_codes_are_nearest_table_entries():
    assert torch.equal(nf4_codes(NF4_TABLE), torch.arange(16, dtype=torch.uint8))
    x = torch.linspace(-1, 1, 1001)
    nearest = (x[:, None] - NF4_TABLE[None, :]).abs().argmin(1)
    assert torch.equal(nf4_codes(x).long(), nearest)


def test_double_quantized_scales_within_half_a_step():
    absmax = torch.rand(1000) * 0.3 + 1e-3
    codes, step, offset = double_quantize(absmax, block=256)
    assert codes.dtype == torch.uint8 and step.shape == (4,) and offset.shape == (4,)
    back = dequantize_scales_ref(codes, step, offset, 256)
    blocks = torch.arange(1000) // 256
    assert ((back - absmax).abs() <= step[blocks] / 2 + 1e-7).all()


def test_nf4_beats_symmetric_int4_on_gaussian_weights_and_double_quant_is_free():
    torch.manual_seed(0)
    w = torch.randn(512, 1024) * 0.05
    rel = lambda q: float(((q - w) ** 2).mean() / (w ** 2).mean())  # noqa: E731
    nf4 = rel(rtn(w, NF4Grid(NF4Spec(group_size=64)))[0])
    nf4_plain = rel(rtn(w, NF4Grid(NF4Spec(group_size=64, double_quant=False)))[0])
    int4 = rel(rtn(w, UniformGrid(QuantSpec(torch.int8, 4, True, granularity="per_group", group_size=64)))[0])
    assert nf4 < 0.85 * int4  # 0.0084 vs 0.0106 measured
    assert abs(nf4 - nf4_plain) < 0.01 * nf4_plain


# -- lowering and kernels --------------------------------------------------------------------------
def test_int8_per_channel_uses_int8_weight_kernel_for_few_rows_and_matches_reference():
    from qcompile.kernels import wo_kernel_info
    m = mlp()
    art = compile_wo(m, WeightSpec(bits=8))
    ks = kernels(art).values()
    if wo_kernel_info()["available"]:  # qcompile's GEMV, int16 activations: up to 32 rows in calls of 16
        assert all(k.startswith("qcompile int8 GEMV") and "2 rows interleaved per block" in k
                   and "up to 32 rows in calls of 16" in k for k in ks)
    else:
        assert all("aten._weight_int8pack_mm (bf16" in k for k in ks)
    assert len(kernels(art)) == 2
    x24 = torch.randn(24, 256, generator=torch.Generator().manual_seed(3))  # two GEMV calls of 16 + 8 rows
    with torch.no_grad():
        assert sqnr(m(X), art(X)) > 36  # bf16 kernel path
        assert sqnr(art.run_reference(X), art(X)) > BF16_DB
        assert sqnr(art.run_reference(x24), art(x24)) > BF16_DB
        assert sqnr(m(X_MANY), art(X_MANY)) > 38  # dequantize + fp32 GEMM path: 39.7 dB measured
        assert sqnr(art.run_reference(X_MANY), art(X_MANY)) > 80
    assert art.report.bits_per_weight() == {"linear": 8 + 32 / 256, "linear_1": 8 + 32 / 512}  # fp32 scales


@pytest.mark.parametrize("weights", [WeightSpec(bits=8, symmetric=False), WeightSpec(bits=4, group_size=64)])
def test_fp32_kernels_compute_exactly_what_the_reference_says(weights):
    art = compile_wo(mlp(), weights, backend_options={"weight_only_activations": "fp32"})
    assert all("fp32 activations" in k for k in kernels(art).values())
    with torch.no_grad():
        assert sqnr(art.run_reference(X), art(X)) > 80


def test_int8_affine_weights_are_corrected_exactly():
    m = mlp()
    art = compile_wo(m, WeightSpec(bits=8, symmetric=False))
    with torch.no_grad():
        assert sqnr(art.run_reference(X), art(X)) > BF16_DB
        assert sqnr(art.run_reference(X_MANY), art(X_MANY)) > 80
    # int8 codes + fp32 scale + fp32 (scale * zero point) per output channel
    assert art.report.bits_per_weight()["linear"] == 8 + 64 / 256


@pytest.mark.parametrize("group,symmetric", [(32, True), (64, False), (128, True), (128, False)])
def test_int4_group_wise_runs_the_int4_kernel(group, symmetric):
    m = mlp()
    art = compile_wo(m, WeightSpec(bits=4, group_size=group, symmetric=symmetric))
    gemv = wo_kernel_info()["available"]  # qcompile's GEMV (csrc/wo_gemv.c), else torch's int4 kernel
    assert all(k.startswith("qcompile int4 GEMV" if gemv else "aten._weight_int4pack_mm_for_cpu")
               for k in kernels(art).values())
    with torch.no_grad():
        fp32 = gemv and all("fp32 activations" in k for k in kernels(art).values())  # else bf16 activations
        assert sqnr(art.run_reference(X), art(X)) > (80 if fp32 else BF16_DB)
        assert 15 < sqnr(m(X), art(X)) < 30
    # packed codes (4 bits) + bf16 scale and bf16 zero per group (torch), or fp32 scale [+ uint8 zero] (GEMV)
    extra = (32 + (0 if symmetric else 8)) if gemv else 32
    assert art.report.bits_per_weight() == {"linear": 4 + extra / group, "linear_1": 4 + extra / group}
    assert art.report.sizes["bits_per_quantized_weight"] == pytest.approx(4 + extra / group)


def test_int4_falls_back_with_the_reason_when_the_kernel_cannot_run():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 40), nn.ReLU(), nn.Linear(40, 32)).eval()  # 40 % 16 != 0; K=40 no int4 group
    art = compile_wo(m, WeightSpec(bits=4))  # per-channel int4
    ks = kernels(art)
    if wo_kernel_info()["available"]:  # qcompile's int4 GEMV takes any out_features
        assert ks["linear"].startswith("qcompile int4 GEMV") and "g256" in ks["linear"]
    else:
        assert "stored as int8" in ks["linear"] and "out_features % 16" in ks["linear"]
    assert "in_features=40 is not a multiple of 16" in ks["linear_1"]
    art_g = compile_wo(nn.Sequential(nn.Linear(96, 32)).eval(), WeightSpec(bits=4, group_size=48), x=torch.randn(2, 96))
    if wo_kernel_info()["available"]:  # qcompile's int4 GEMV takes any group size % 16
        assert kernels(art_g)["linear"].startswith("qcompile int4 GEMV") and "g48" in kernels(art_g)["linear"]
    else:
        assert "codes dequantized at every call" in kernels(art_g)["linear"]
    with torch.no_grad():
        assert sqnr(art.run_reference(X), art(X)) > BF16_DB


def test_group_size_that_does_not_divide_the_input_is_a_config_error():
    with pytest.raises(ConfigError, match="does not divide"):
        compile_wo(nn.Sequential(nn.Linear(100, 32)).eval(), WeightSpec(bits=4, group_size=64), x=torch.randn(2, 100))


def test_nf4_double_quant_bytes_and_report_names_the_kernel():
    m = mlp()
    art = compile_wo(m, WeightSpec(dtype="nf4", group_size=64))
    want = "qcompile LUT-decode kernel" if nf4_kernel_info()["available"] else "dequantized to fp32 at every call"
    assert all(want in k for k in kernels(art).values())
    roles = {r["role"] for r in art.report.storage if r["layer"] == "linear"}
    assert roles == {"codes", "scales", "bias"}
    n_groups, n_w = 512 * 256 // 64, 512 * 256
    expected = (n_w / 2 + n_groups + 8 * -(-n_groups // 256)) * 8 / n_w  # codes + uint8 scales + step/offset
    assert art.report.bits_per_weight()["linear"] == pytest.approx(expected, abs=1e-4)  # 4.129
    plain = compile_wo(m, WeightSpec(dtype="nf4", group_size=64, double_quant=False))
    assert plain.report.bits_per_weight()["linear"] == pytest.approx(4.5)
    with torch.no_grad():
        assert sqnr(art.run_reference(X), art(X)) > 100
        assert abs(sqnr(m(X), art(X)) - sqnr(m(X), plain(X))) < 0.3


def test_embedding_tables_are_gathered_from_packed_int4():
    torch.manual_seed(0)

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.proj = nn.Embedding(1000, 64), nn.Linear(64, 32)

        def forward(self, ids):
            return self.proj(self.emb(ids))

    m, ids = Tok().eval(), torch.randint(0, 1000, (2, 12))
    default = compile_wo(m, WeightSpec(bits=4, group_size=32, symmetric=False), x=ids)
    assert kernels(default)["embedding"].startswith("int8 rows")  # tables stay 8-bit unless asked
    assert default.report.bits_per_weight()["embedding"] == 8 + 32 / 64
    art = compile_wo(m, WeightSpec(bits=4, group_size=32, symmetric=False), x=ids,
                     backend_options={"embedding_weights": "same"})
    assert "packed 4-bit" in kernels(art)["embedding"]
    with torch.no_grad():
        assert sqnr(art.run_reference(ids), art(ids)) > BF16_DB
        assert sqnr(m(ids), art(ids)) > 15
    emb_bytes = sum(r["bytes"] for r in art.report.storage if r["layer"] == "embedding")
    assert emb_bytes == 1000 * 32 + 1000 * 2 * 4 + 1000 * 2  # packed codes, fp32 scales, uint8 zero points


def test_int4_g128_stack_is_at_most_016_of_float_bytes():
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(2)]).eval()
    art = compile_wo(m, WeightSpec(bits=4, group_size=128), x=torch.randn(1, 1024))
    sizes = art.report.sizes
    assert sizes["stored_bytes"] == sum(r["bytes"] for r in art.report.storage)
    assert sizes["stored_vs_float"] <= 0.16  # 4.25 bits / 32 = 0.133 plus fp32 biases
    assert sizes["float_model_bytes"] == sum(p.numel() * 4 for p in m.parameters())


@pytest.mark.parametrize("weights", [WeightSpec(bits=4, group_size=32, symmetric=False),
                                     WeightSpec(dtype="nf4", group_size=32)])
def test_save_load_roundtrip(tmp_path, weights):
    m = mlp()
    art = compile_wo(m, weights)
    path = art.save(os.path.join(tmp_path, "m.qc"))
    back = qcompile.load(path)
    with torch.no_grad():
        assert torch.equal(back(X), art(X))
    assert kernels(back) == kernels(art)


# -- the real model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    from _zoo import minilm_case
    return minilm_case(max_length=64)  # seq 64 keeps it quick


@pytest.mark.slow
def test_minilm_int4_g128_round_to_nearest(minilm):
    """Round-to-nearest int4 g128 (affine): min cosine 0.953 measured -- the 0.97 of issue 5 needs GPTQ
    (tests/test_gptq.py: 0.97+ with 64 calibration sentences)."""
    art = qcompile.compile(minilm.model, minilm.example_inputs, backend="x86", mode="weight_only", verify=False,
                           weights=WeightSpec(bits=4, group_size=128, symmetric=False))
    cos = (minilm.embed(art) * minilm.reference).sum(-1)
    assert cos.min() >= 0.945 and cos.mean() >= 0.955
    linears = {k: v for k, v in art.report.bits_per_weight().items() if "embedding" not in k}
    assert set(linears.values()) == {4.25}
