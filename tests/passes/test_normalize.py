"""Normalize and CanonicalLinear: Before / Expected graphs, compared structurally and numerically."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompile.passes.canonical_linear import CanonicalLinear
from qcompile.passes.capture import capture
from qcompile.passes.normalize import Normalize, functional_sibling

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _breadth_models as M  # noqa: E402

aten = torch.ops.aten


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _mutable(gm):
    return [t for t in _targets(gm) if getattr(getattr(t, "_schema", None), "is_mutable", False)]


@pytest.mark.parametrize("inplace, functional", [
    (aten.silu_.default, aten.silu.default), (aten.gelu_.default, aten.gelu.default),
    (aten.dropout_.default, aten.dropout.default), (aten.leaky_relu_.default, aten.leaky_relu.default),
    (aten.sigmoid_.default, aten.sigmoid.default), (aten.elu_.default, aten.elu.default),
    (aten.add_.Tensor, aten.add.Tensor), (aten.clamp_.default, aten.clamp.default),
    (aten.hardtanh_.default, aten.hardtanh.default), (aten.mul_.Scalar, aten.mul.Scalar),
])
def test_functional_sibling_is_read_from_the_schema(inplace, functional):
    assert functional_sibling(inplace) is functional


@pytest.mark.parametrize("op", [aten.silu.default, aten.conv2d.default, aten.view.default, aten.relu6.default])
def test_functional_ops_have_no_sibling(op):
    assert functional_sibling(op) is None


def test_every_inplace_op_of_an_eval_graph_becomes_functional():
    model, x = M.InplaceActs().eval(), torch.randn(2, 3, 16, 16)
    gm = capture(model, (x,))
    assert len(_mutable(gm)) >= 5  # silu_, leaky_relu_, dropout_, sigmoid_, hardswish_, elu_ as captured
    assert Normalize()(gm).modified
    assert _mutable(gm) == []
    assert not any("dropout" in str(t) for t in _targets(gm))
    assert torch.equal(gm(x), model(x))


def test_later_readers_of_a_mutated_tensor_read_the_result():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            a = self.conv(x)
            before = a * 2          # reads a before the mutation
            b = a.sigmoid_()        # a is mutated here
            return before + a + b   # reads a after: the sigmoid

    model, x = Reuse().eval(), torch.randn(1, 3, 4, 4)
    expected = model(x)
    gm = capture(model, (x,))
    Normalize()(gm)
    assert _mutable(gm) == []
    assert torch.allclose(gm(x), expected, atol=1e-6)


def test_mutation_of_a_graph_input_is_kept():
    class MutInput(nn.Module):
        def forward(self, x):
            x.mul_(2)
            return x.clone().view(-1) + 1

    gm = capture(MutInput(), (torch.randn(2, 3),))
    Normalize()(gm)
    assert aten.mul_.Tensor in _targets(gm) or aten.mul_.Scalar in _targets(gm)
    assert aten.clone.default in _targets(gm)  # copies kept while a mutation remains
    x = torch.randn(2, 3)
    assert torch.equal(gm(x.clone()), MutInput()(x.clone()))


def test_channel_shuffle_copy_is_dropped_and_views_become_reshapes():
    model, x = M.ChannelShuffle().eval(), torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,))
    assert aten.contiguous.default in _targets(gm)
    Normalize()(gm)
    targets = _targets(gm)
    assert aten.contiguous.default not in targets and aten.view.default not in targets
    assert targets.count(aten.reshape.default) == 2
    assert torch.equal(gm(x), model(x))
    assert torch.equal(gm(M.channels_last(x)), model(x))


def test_addmm_mm_matmul_with_constant_weights_become_linear():
    model, x = M.MatmulMLP().eval(), torch.randn(2, 5, 32)
    gm = capture(model, (x,))
    assert {aten.addmm.default, aten.mm.default, aten.matmul.default} <= set(_targets(gm))
    assert CanonicalLinear()(gm).modified
    targets = _targets(gm)
    assert targets.count(aten.linear.default) == 3
    assert not {aten.addmm.default, aten.mm.default, aten.matmul.default} & set(targets)
    assert torch.allclose(gm(x), model(x), atol=1e-5)
    # the [in, out] parameters are stored once, as [out, in]
    lin = [n for n in gm.graph.nodes if n.target == aten.linear.default]
    assert [tuple(getattr(gm, n.args[1].target).shape) for n in lin] == [(64, 32), (32, 64), (32, 32)]


class _NotLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.b = nn.Parameter(torch.randn(8))

    def forward(self, x, y):
        return torch.addmm(self.b, x, self.w, beta=0.5) + x @ y + torch.mm(self.w, x.t()).t()


def test_non_linear_products_are_left_alone():
    x, y = torch.randn(4, 8), torch.randn(8, 8)
    gm = capture(_NotLinear(), (x, y), dynamic_batch=False)
    assert not CanonicalLinear()(gm).modified


def test_shared_weight_is_transposed_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 16))

        def forward(self, x):
            return torch.mm(F.relu(torch.mm(x, self.w)), self.w)

    model, x = Tied().eval(), torch.randn(3, 16)
    gm = capture(model, (x,))
    CanonicalLinear()(gm)
    weights = {n.args[1].target for n in gm.graph.nodes if n.target == aten.linear.default}
    assert len(weights) == 1
    assert torch.allclose(gm(x), model(x), atol=1e-5)
