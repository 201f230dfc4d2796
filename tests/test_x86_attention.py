"""Static int8 attention on x86: Q.K^T and P.V as int8 x int8 -> int32 (torch._int_mm per batch slice)."""
import pytest
import torch

import qcompile
import _zoo as zoo
from qcompile.qparams import sqnr

def test_int8_matmul_is_the_reference_requantized_within_one_step():
    """Both kernels (the VNNI batched one where the CPU has it, the torch._int_mm one everywhere), odd
    sizes (padding of M, K, N), strided operands (K transposed, as attention reads it)."""
    from qcompile.backends.x86.rules import int8_matmul, int8_matmul_int_mm
    from qcompile.kernels import u8_bmm, u8_bmm_available
    g = torch.Generator().manual_seed(0)
    kernels = [int8_matmul_int_mm, int8_matmul] + ([u8_bmm] if u8_bmm_available() else [])
    for (sa, sb), (za, zb) in zip((((2, 3, 16, 8), (2, 3, 8, 12)), ((2, 3, 17, 9), (2, 3, 9, 70)),
                                   ((5, 33, 130), (5, 130, 20))), ((128, 128), (0, 255), (37, 200))):
        a = torch.quantize_per_tensor(torch.randn(*sa, generator=g), 0.02, za, torch.quint8)
        b = torch.quantize_per_tensor(torch.randn(*sb[:-2], sb[-1], sb[-2], generator=g), 0.03, zb,
                                      torch.quint8).transpose(-2, -1)
        ref = torch.quantize_per_tensor(a.dequantize() @ b.dequantize(), 0.01, 100, torch.quint8)
        for kernel in kernels:
            out = kernel(a, b, 0.01, 100)
            diff = (out.int_repr().int() - ref.int_repr().int()).abs()
            assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99, (kernel.__name__, sa, za, zb)


def test_int8_matmul_with_an_fp32_output_is_the_dequantized_product():
    """scale=None: no requantize, the int32 product times scale_a * scale_b as fp32 (Q.K^T before softmax)."""
    from qcompile.backends.x86.rules import int8_matmul, int8_matmul_int_mm
    from qcompile.kernels import u8_bmm, u8_bmm_available
    g = torch.Generator().manual_seed(0)
    kernels = [int8_matmul_int_mm, int8_matmul] + ([u8_bmm] if u8_bmm_available() else [])
    for (sa, sb), (za, zb) in zip((((2, 3, 16, 8), (2, 3, 8, 12)), ((2, 3, 17, 9), (2, 3, 9, 70))),
                                  ((128, 128), (37, 200))):
        a = torch.quantize_per_tensor(torch.randn(*sa, generator=g), 0.02, za, torch.quint8)
        b = torch.quantize_per_tensor(torch.randn(*sb[:-2], sb[-1], sb[-2], generator=g), 0.03, zb,
                                      torch.quint8).transpose(-2, -1)
        ref = a.dequantize().double() @ b.dequantize().double()
        for kernel in kernels:
            out = kernel(a, b, None)
            assert out.dtype == torch.float32 and out.shape == ref.shape, kernel.__name__
            assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), kernel.__name__


def test_the_batched_kernel_runs_where_the_cpu_has_avx512_vnni():
    from qcompile.kernels import nf4_kernel_info, u8_bmm_available
    flags = open("/proc/cpuinfo").read()
    has = "avx512_vnni" in flags and "avx512bw" in flags
    assert u8_bmm_available() == (has and nf4_kernel_info()["available"])


def test_attention_matmuls_run_int8_when_asked_and_match_the_reference():
    torch.manual_seed(0)
    model = zoo.bert_encoder_shaped(vocab=100, hidden=64, layers=2, heads=4, intermediate=128).eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randint(0, 100, (2, 16), generator=g) for _ in range(4)]
    art = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal, backend_options={"attention": "int8"})
    mm = [r for r in art.report.rows if r.op == "matmul"]
    assert len(mm) == 4 and all(r.status == "int8" and "int8_matmul" in r.kernel for r in mm)
    assert art.report.summary()["int8_mac_share"] == 1.0
    assert art.report.verify["within_one_step"] >= 0.99
    with torch.no_grad():
        x = torch.randint(0, 100, (3, 16), generator=g)
        assert sqnr(model(x), art(x)) > 30


class _SDPA(torch.nn.Module):
    def __init__(self, mask=None, causal=False, scale=None):
        super().__init__()
        self.mask, self.causal, self.scale = mask, causal, scale

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal,
                                                                scale=self.scale)


def _decomposed(model, args):
    from qcompile.passes.decompose_sdpa import SDPA, DecomposeSDPA
    gm = torch.export.export(model, args).module()
    assert any(n.target == SDPA for n in gm.graph.nodes)
    from torch import fx
    gm = fx.GraphModule(gm, gm.graph)
    assert DecomposeSDPA()(gm).modified
    assert not any(n.target == SDPA for n in gm.graph.nodes)
    return gm


def test_sdpa_decomposition_is_exact_in_float_with_every_mask_kind():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    cases = {"none": _SDPA(), "causal": _SDPA(causal=True), "scale": _SDPA(scale=0.3),
             "float mask": _SDPA(mask=torch.randn(10, 10, generator=g)),
             "bool mask": _SDPA(mask=torch.rand(2, 1, 10, 10, generator=g) > 0.3)}
    for name, model in cases.items():
        gm = _decomposed(model, (q, k, v))
        torch.testing.assert_close(gm(q, k, v), model(q, k, v), atol=1e-5, rtol=1e-5, msg=name)


def test_sdpa_with_dropout_or_gqa_stays_fused_with_a_reason():
    from qcompile.passes.decompose_sdpa import sdpa_arguments, why_not
    g = torch.Generator().manual_seed(0)
    gm = torch.export.export(_SDPA(), tuple(torch.randn(1, 4, 6, 8, generator=g) for _ in range(3))).module()
    node = next(n for n in gm.graph.nodes if sdpa_arguments(n))
    args = sdpa_arguments(node)
    assert why_not(args) is None
    assert "dropout" in why_not({**args, "dropout_p": 0.1})
    assert "grouped-query" in why_not({**args, "enable_gqa": True})


def test_torch_transformer_encoder_attention_runs_int8_on_x86_when_asked():
    """nn.TransformerEncoder attends with SDPA: with attention="int8" static x86 writes it out and runs Q.K^T
    and P.V in int8."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(2, 16, 64, generator=g) for _ in range(4)]
    art = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal, backend_options={"attention": "int8"})
    mm = [r for r in art.report.rows if r.op == "matmul"]
    assert len(mm) == 4 and all(r.status == "int8" and "int8_matmul" in r.kernel for r in mm)
    assert [r.status for r in art.report.rows if r.op == "softmax"] == ["float: unsupported by backend"] * 2
    # Q.K^T feeds the float score scale and softmax: its scores leave the kernel as fp32 (no uint8 grid);
    # P.V feeds the int8 out-projection: requantized
    assert ["fp32 output" in r.kernel for r in mm] == [True, False, True, False]
    views = [r for r in art.report.rows if r.op in ("unflatten", "unsqueeze", "squeeze", "select")]
    assert views and all(r.status == "int8" for r in views)  # int8 from the in-projection to Q, K, V
    assert art.report.verify["within_one_step"] >= 0.99
    with torch.no_grad():
        x = torch.randn(3, 16, 64, generator=g)
        assert sqnr(model(x), art(x)) > 30
        assert sqnr(art.reference(x), art(x)) > 50
    dyn = qcompile.compile(model, (cal[0],), backend="x86", mode="dynamic")  # float modes keep the fused op
    assert any(r.op == "scaled_dot_product_attention" for r in dyn.report.rows)


def test_short_attention_is_float_by_default_named_in_the_report_and_its_projections_write_fp32():
    """X86Options.attention="auto" (the default) at 16 tokens, heads of 16 (far below 128 x 64 x 128 per head):
    SDPA stays fused and fp32, an eager attention's Q.K^T / P.V matmuls are not quantized, every such row says
    why and how to force int8; the linears stay int8, and those feeding the attention write fp32. The same on
    every CPU (the size decides before the kernel does). attention="float" says it was asked for."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    sdpa_model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    eager_model = zoo.bert_encoder_shaped(vocab=100, hidden=64, layers=2, heads=4, intermediate=128).eval()
    g = torch.Generator().manual_seed(1)
    cases = ((sdpa_model, [torch.randn(2, 16, 64, generator=g) for _ in range(4)], "scaled_dot_product_attention", 2),
             (eager_model, [torch.randint(0, 100, (2, 16), generator=g) for _ in range(4)], "matmul", 4))
    for model, cal, op, count in cases:
        for option, why in (("auto", "in int8 only where that measured faster"), ("float", "asks for fp32")):
            art = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal,
                                   backend_options={"attention": option})
            attn = [r for r in art.report.rows if r.op == op]
            assert len(attn) == count and all(r.status == "float: unsupported by backend" for r in attn), op
            assert all(why in r.reason for r in attn), [r.reason for r in attn]
            if option == "auto":
                assert all("'attention': 'int8'" in r.reason and ("below 128 x 64 x 128" in r.reason or
                                                                  "no AVX-512 VNNI" in r.reason) for r in attn)
            assert not any(r.op == "matmul" and r.status == "int8" for r in art.report.rows)
            linears = [r for r in art.report.rows if r.op == "linear"]
            assert linears and all(r.status == "int8" for r in linears)
            assert any("fp32 output" in r.kernel for r in linears)
            assert art.report.verify["within_one_step"] >= 0.99
            with torch.no_grad():
                x = cal[0]
                assert sqnr(model(x), art(x)) > 30
                assert sqnr(art.reference(x), art(x)) > 50
    with pytest.raises(qcompile.ConfigError, match="attention must be 'auto', 'float' or 'int8'"):
        qcompile.compile(sdpa_model, (cases[0][1][0],), backend="x86", calibration=cases[0][1],
                         backend_options={"attention": "bf16"})


def test_long_attention_runs_int8_by_default_where_the_batched_kernel_is_built():
    """attention="auto" at 128 tokens, heads of 64 (128 x 64 x 128 per head, the threshold): int8 on the
    AVX-512 VNNI batched kernel where this CPU / build has it, fp32 (with that reason) where it does not."""
    from qcompile.kernels import u8_bmm_available
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(128, 2, 256, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(1, 128, 128, generator=g) for _ in range(4)]
    art = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal)
    mm = [r for r in art.report.rows if r.op == "matmul"]
    sdpa = [r for r in art.report.rows if r.op == "scaled_dot_product_attention"]
    if u8_bmm_available():
        assert len(mm) == 2 and not sdpa and all(r.status == "int8" and "batched kernel" in r.kernel for r in mm)
    else:
        assert not mm and len(sdpa) == 1 and "no AVX-512 VNNI" in sdpa[0].reason
    assert art.report.verify["within_one_step"] >= 0.99
    with torch.no_grad():
        assert sqnr(model(cal[0]), art(cal[0])) > 30
