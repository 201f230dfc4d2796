"""padding="same" / "valid" convs (aten.conv*.padding) are rewritten to integer padding and quantized."""
import pytest
import torch
from torch import fx, nn

import qcompile
from qcompile.passes.conv_padding import rewrite_string_padding
from qcompile.qparams import sqnr


class SameNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding="same")                      # even total: symmetric 1
        self.b = nn.Conv2d(8, 8, (4, 2), padding="same")                 # odd totals: explicit end pad
        self.c = nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=8)
        self.d = nn.Conv2d(8, 4, 3, padding="valid")

    def forward(self, x):
        return self.d(torch.relu(self.c(self.b(torch.relu(self.a(x))))))


class Same1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(4, 6, 4, padding="same")

    def forward(self, x):
        return self.a(x)


@pytest.mark.parametrize("model,shape", [(SameNet(), (2, 3, 12, 10)), (Same1d(), (2, 4, 16))])
def test_rewrite_is_exact_in_float(model, shape):
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(*shape)
    gm = torch.export.export(model, (x,)).module()
    gm = fx.GraphModule(gm, gm.graph)
    assert any(n.target in (torch.ops.aten.conv2d.padding, torch.ops.aten.conv1d.padding) for n in gm.graph.nodes)
    assert rewrite_string_padding(gm)
    gm.recompile()
    assert not any("padding" == getattr(n.target, "_overloadname", None) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_same_padding_convs_run_int8_on_x86():
    torch.manual_seed(0)
    model = SameNet().eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(2, 3, 12, 10, generator=g) for _ in range(4)]
    art = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal)
    convs = [r for r in art.report.rows if r.op == "conv2d"]
    assert len(convs) == 4 and all(r.status == "int8" for r in convs[:3])
    # quantize_outputs=False keeps the last layer's output float: an int8 conv with an fp32 result (oneDNN)
    from qcompile.backends.x86.rules import CONV_FLOAT_OUTPUT_KERNEL, conv_float_output_available
    if conv_float_output_available():
        assert convs[3].status == "int8" and convs[3].kernel.startswith(CONV_FLOAT_OUTPUT_KERNEL)
    else:
        assert convs[3].status == "float: model output"
    pads = [r for r in art.report.rows if r.op == "constant_pad_nd"]
    assert len(pads) == 1 and pads[0].module == "b"  # the odd "same" total: named in the report
    assert art.report.verify["within_one_step"] >= 0.99
    with torch.no_grad():
        assert sqnr(model(cal[0]), art(cal[0])) > 25
