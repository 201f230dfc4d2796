"""Per-pass tests: build a Before module, run the pass, compare graph structure and numbers."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from qcompile import annotation as A
from qcompile.passes.capture import capture
from qcompile.passes.fold_batch_norm import FoldBatchNorm
from qcompile.passes.fuse import FuseGroups
from qcompile.passes.infra import PassManager
from qcompile.passes.insert_observers import OBSERVED, InsertObservers
from qcompile.passes.normalize import Normalize
from qcompile.passes.pattern import Rule, RuleSet, op_kind
from qcompile.backends import get_backend
from qcompile.config import QConfig
from qcompile.observers import make_observer


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1)


def _kinds(gm):
    return [op_kind(n) for n in gm.graph.nodes if n.op == "call_function"]


def test_normalize_rewrites_inplace_and_drops_dropout():
    class M(nn.Module):
        def forward(self, x):
            return F.dropout(F.relu6(x), 0.5, training=False) + 1

    gm = capture(M(), (torch.randn(2, 3),))
    x = torch.randn(2, 3)
    expected = gm(x)
    res = Normalize()(gm)
    assert res.modified
    res.graph_module.recompile()
    assert "dropout" not in str(res.graph_module.code)
    assert torch.equal(res.graph_module(x), expected)


def test_fold_batch_norm_structure_and_numbers():
    m = ConvBnRelu().eval()
    x = torch.randn(2, 3, 10, 10)
    gm = PassManager([Normalize(), FoldBatchNorm()])(capture(m, (x,))).graph_module
    assert _kinds(gm) == ["conv2d", "relu", "max_pool2d", "flatten"]
    torch.testing.assert_close(gm(x), m(x), atol=1e-5, rtol=1e-5)
    # the batch-norm's tensors and the pre-fold weight are gone from the module, not only from the graph
    state = dict(gm.named_parameters()) | dict(gm.named_buffers())
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert set(state) == reads and len(reads) == 2


def test_reference_graph_holds_only_integer_weights():
    import qcompile
    m, x = ConvBnRelu().eval(), torch.randn(2, 3, 10, 10)
    art = qcompile.compile(m, (x,), backend="x86", calibration=[x], progress=False, verify=False)
    tensors = dict(art.reference.named_parameters()) | dict(art.reference.named_buffers())
    weights = [k for k, t in tensors.items() if t.dim() == 4]
    assert len(weights) == 1 and tensors[weights[0]].dtype == torch.int8  # no float copy of the conv weight
    assert art.report.sizes["int8_share_of_bytes"] > 0.6  # 108 int8 weight bytes; bias, scales, int64 zero points: 64


def test_largest_pattern_wins():
    rules = RuleSet([Rule("conv2d", ("conv2d",)), Rule("conv2d_relu", ("conv2d", "relu"))])
    gm = PassManager([Normalize(), FoldBatchNorm(), FuseGroups(rules)])(capture(ConvBnRelu().eval(),
                                                                             (torch.randn(1, 3, 8, 8),))).graph_module
    conv = next(n for n in gm.graph.nodes if op_kind(n) == "conv2d")
    assert A.get_group(conv).pattern == "conv2d_relu"
    assert A.get_group(conv).nodes == ("conv2d", "relu")


def test_rule_check_reason_is_recorded_and_matching_does_not_mutate():
    rules = RuleSet([Rule("conv2d", ("conv2d",), check=lambda nodes: "no thanks")])
    gm = capture(ConvBnRelu().eval(), (torch.randn(1, 3, 8, 8),))
    before = str(gm.graph)
    conv = next(n for n in gm.graph.nodes if op_kind(n) == "conv2d")
    rule, nodes, reasons = rules.match(conv)
    assert rule is None and reasons == ["conv2d: no thanks"] and str(gm.graph) == before


def test_observers_share_across_maxpool_and_flatten():
    be = get_backend("x86")
    cfg = QConfig().with_defaults(be.default_config("static").weights, be.default_config("static").activations)
    gm = capture(ConvBnRelu().eval(), (torch.randn(1, 3, 8, 8),))
    gm = PassManager(be.prepare_passes(cfg, "static") + [InsertObservers(make_observer)])(gm).graph_module
    observed = gm.meta[OBSERVED]
    shared = [names for names in observed.values() if "max_pool2d" in names]
    assert shared and {"relu", "max_pool2d"} <= set(shared[0])  # one observer, one set of qparams
    assert len(observed) == 2  # the input, and relu/maxpool (flatten feeds the output: float)
