"""Weights computed from parameters (weight_norm, transposes) are folded to constants and quantized."""
import torch
from torch import fx, nn
from torch.nn.utils.parametrizations import weight_norm

import qcompile
from qcompile.passes.const_fold import fold_constants
from qcompile.qparams import sqnr


class WeightNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = weight_norm(nn.Conv1d(8, 8, 5, padding=2, groups=2), name="weight", dim=2)
        self.fc = nn.Linear(8, 4)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean(-1)
        return self.fc(y * (self.gain * 2.0))  # a buffer expression: folded to one constant


def _folded(model, x):
    """``model``'s exported graph with its constants folded (asserting that something folded)."""
    gm = torch.export.export(model, (x,)).module()
    gm = fx.GraphModule(gm, gm.graph)
    assert fold_constants(gm)
    gm.recompile()
    return gm


def test_folding_is_exact_and_leaves_no_computation_on_parameters():
    torch.manual_seed(0)
    model = WeightNormed().eval()
    x = torch.randn(2, 8, 20)
    gm = _folded(model, x)
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            assert any(n.op == "placeholder" or n.op == "call_function" for n in node.all_input_nodes), node
    torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=1e-6)


def test_weight_normed_conv_is_int8_on_executorch_and_onnx():
    torch.manual_seed(0)
    model = WeightNormed().eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(2, 8, 20, generator=g) for _ in range(4)]
    for backend in ("onnx", "executorch"):
        rep = qcompile.explain(model, (cal[0],), backend=backend)
        conv = [r for r in rep.rows if r.op == "conv1d"]
        assert len(conv) == 1 and conv[0].status == "int8", (backend, conv)
    art = qcompile.compile(model, (cal[0],), backend="onnx", calibration=cal)
    with torch.no_grad():
        assert sqnr(model(cal[1]), art(cal[1])) > 25
    assert model.conv.parametrizations.weight.original0.requires_grad  # the user's model is untouched


def test_conv1d_runs_int8_on_x86_within_one_step():
    """x86 has quantized::conv1d (plain, relu-fused, depthwise): conv1d no longer stays float."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 16, 3, padding=1, groups=16),
                          nn.Conv1d(16, 8, 3, stride=2), nn.Flatten(), nn.Linear(8 * 15, 4)).eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(2, 4, 32, generator=g) for _ in range(4)]
    art = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal)
    convs = [r for r in art.report.rows if r.op == "conv1d"]
    assert len(convs) == 3 and all(r.status == "int8" and r.kernel.startswith("quantized::conv1d") for r in convs)
    assert art.report.verify["within_one_step"] >= 0.99
    with torch.no_grad():
        assert sqnr(model(cal[1]), art(cal[1])) > 25
    wn = qcompile.compile(WeightNormed().eval(), (torch.randn(2, 8, 20),), backend="x86",
                          calibration=[torch.randn(2, 8, 20, generator=g) for _ in range(3)])
    assert [r.status for r in wn.report.rows if r.op == "conv1d"] == ["int8"]


class PositionBiasMLP(nn.Module):
    """Swin V2's continuous position bias: a 2 -> 64 -> heads MLP over a fixed coordinate table, added to
    the attention scores, and a small buffer broadcast to activation size (that one must stay an op)."""

    def __init__(self, heads=4, window=5):
        super().__init__()
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"), -1)
        self.register_buffer("table", coords.reshape(-1, 2).float() / window)
        self.mlp = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, heads, bias=False))
        self.proj = nn.Linear(heads, heads)
        self.register_buffer("row", torch.linspace(0, 1, heads))

    def forward(self, x):                               # x: [B, window * window, heads]
        bias = 16 * torch.sigmoid(self.mlp(self.table))  # [window * window, heads]: 25 x 64 inside, 25 x 4 out
        return self.proj(x + bias) + self.row.expand(x.shape[0], x.shape[1], -1)


def test_a_constant_chain_that_expands_then_reduces_folds_and_a_broadcast_does_not():
    torch.manual_seed(0)
    model = PositionBiasMLP().eval()
    x = torch.randn(3, 25, 4)
    gm = _folded(model, x)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.linear.default) == 1  # only proj: the MLP over the table is a constant
    assert torch.ops.aten.sigmoid.default not in targets
    assert torch.ops.aten.expand.default in targets  # the broadcast to activation size stays an op
    torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=1e-6)
