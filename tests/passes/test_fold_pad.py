"""TF-style explicit zero padding before a conv becomes the conv's padding (passes/fold_pad.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import qcompile
from qcompile.passes.fold_pad import _conv_args, fold_pads
from qcompile.qparams import sqnr

aten = torch.ops.aten


class TfSame(nn.Module):
    """MobileNet V1 as Hugging Face writes it with tf_padding: an explicit pad in front of every conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.dw1 = nn.Conv2d(8, 8, 3, groups=8)
        self.pw1 = nn.Conv2d(8, 16, 1)
        self.dw2 = nn.Conv2d(16, 16, (3, 5), groups=16)
        self.pw2 = nn.Conv2d(16, 8, 1, padding=1)

    def forward(self, x):
        x = F.relu6(self.stem(F.pad(x, (0, 1, 0, 1))))           # stride-2 "same": asymmetric, stays
        x = F.relu6(self.dw1(F.pad(x, (1, 1, 1, 1), "constant", 0.0)))  # symmetric: folded
        x = F.relu6(self.pw1(F.pad(x, (0, 0, 0, 0))))             # nothing: removed
        x = F.relu6(self.dw2(F.pad(x, (2, 2, 1, 1))))             # different per dim: folded
        return self.pw2(F.pad(x, (1, 1, 1, 1)))                   # added to the conv's own padding


class NotFoldable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        p = F.pad(x, (1, 1, 1, 1))
        q = F.pad(x, (1, 1, 1, 1), value=0.5)                      # not a zero pad
        r = F.pad(x, (1, 1, 1, 1), mode="reflect")                 # not a constant pad
        return self.conv(p) + p.mean() + self.conv(q) + self.conv(r)  # p: also read by a mean


def _graph(model, x):
    gm = torch.export.export(model, (x,)).run_decompositions({}).module()
    return fx.GraphModule(gm, gm.graph)


def _pads(gm):
    return [n for n in gm.graph.nodes if n.target in (aten.constant_pad_nd.default, aten.pad.default)]


def test_symmetric_zero_pads_fold_into_the_conv_exactly():
    torch.manual_seed(0)
    model, x = TfSame().eval(), torch.randn(2, 3, 17, 15)
    gm = _graph(model, x)
    assert len(_pads(gm)) == 5
    assert fold_pads(gm)
    gm.recompile()
    left = _pads(gm)
    assert len(left) == 1 and list(left[0].args[1]) == [0, 1, 0, 1]
    paddings = [_conv_args(n, 2)[4] for n in gm.graph.nodes if n.target == aten.conv2d.default]
    assert paddings == [[0, 0], [1, 1], [0, 0], [1, 2], [2, 2]]
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_pads_that_are_not_a_conv_padding_stay():
    torch.manual_seed(0)
    model, x = NotFoldable().eval(), torch.randn(1, 4, 8, 8)
    gm = _graph(model, x)
    before = len(_pads(gm))
    fold_pads(gm)
    gm.recompile()
    assert len(_pads(gm)) == before == 3
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["x86", "onnx", "executorch"])
def test_tf_padding_convs_run_int8_with_one_float_pad(backend):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    if backend == "executorch":
        pytest.importorskip("executorch")
    torch.manual_seed(0)
    model = TfSame().eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(2, 3, 17, 15, generator=g) for _ in range(4)]
    art = qcompile.compile(model, (cal[0],), backend=backend, calibration=cal, progress=False)
    pads = [r for r in art.report.rows if r.op in ("pad", "constant_pad_nd")]
    assert len(pads) == 1 and pads[0].status.startswith("float")  # only the asymmetric stem pad
    convs = [r for r in art.report.rows if r.op == "conv2d"]
    assert len(convs) == 5 and all(r.status == "int8" for r in convs[:4]), [(r.name, r.status) for r in convs]
    assert art.report.verify["within_one_step"] >= 0.99
    with torch.no_grad():
        assert sqnr(model(cal[0]), art(cal[0])) > 25
