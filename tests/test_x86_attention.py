"""Static int8 attention on x86: Q.K^T and P.V as int8 x int8 -> int32 (torch._int_mm per batch slice)."""
import torch

import qcompile
import _zoo as zoo
from qcompile.qparams import sqnr

def test_int8_matmul_is_the_reference_requantized_within_one_step():
    from qcompile.backends.x86.rules import int8_matmul
    g = torch.Generator().manual_seed(0)
    for za, zb in ((128, 128), (0, 255), (37, 200)):
        a = torch.quantize_per_tensor(torch.randn(2, 3, 16, 8, generator=g), 0.02, za, torch.quint8)
        b = torch.quantize_per_tensor(torch.randn(2, 3, 8, 12, generator=g), 0.03, zb, torch.quint8)
        ref = torch.quantize_per_tensor(a.dequantize() @ b.dequantize(), 0.01, 100, torch.quint8)
        out = int8_matmul(a, b, 0.01, 100)
        diff = (out.int_repr().int() - ref.int_repr().int()).abs()
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99, (za, zb)


def test_attention_matmuls_run_int8_and_match_the_reference():
    torch.manual_seed(0)
    model = zoo.bert_encoder_shaped(vocab=100, hidden=64, layers=2, heads=4, intermediate=128).eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randint(0, 100, (2, 16), generator=g) for _ in range(4)]
    art = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal)
    mm = [r for r in art.report.rows if r.op == "matmul"]
    assert len(mm) == 4 and all(r.status == "int8" and "int8_matmul" in r.kernel for r in mm)
    assert art.report.summary()["int8_mac_share"] == 1.0
    assert art.report.verify["within_one_step"] >= 0.99
    with torch.no_grad():
        x = torch.randint(0, 100, (3, 16), generator=g)
        assert sqnr(model(x), art(x)) > 30
