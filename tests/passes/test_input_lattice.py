"""Exact 8-bit image inputs (passes/input_lattice.py): detection, a float graph that computes the same
function, an int8 input that is exact, the same answer on every backend, nothing done to other inputs."""
import pytest
import torch
from torch import nn

import qcompile
from qcompile import annotation as A
from qcompile.passes.input_lattice import AlignInputLattice, detect
from qcompile.qparams import sqnr

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
qd = torch.ops.quantized_decomposed


def pixels(n: int, g: torch.Generator, size: int = 16) -> torch.Tensor:
    """ImageNet-normalized images with 8-bit pixels, as an image pipeline hands them to a model."""
    return (torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255 - MEAN) / STD


def stem_net():
    """A stem that takes differences of neighbouring pixels and amplifies them (as trained image stems do):
    it is sensitive to exactly the half-step noise an unaligned 8-bit input grid adds."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                      nn.Conv2d(16, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        w = m[0].weight
        w -= w.mean(dim=(2, 3), keepdim=True)  # zero-mean filters: edges, not brightness
        m[1].running_var.fill_(0.02)
    return m


def test_detect_finds_each_channels_pixel_lattice_and_rejects_other_inputs():
    g = torch.Generator().manual_seed(0)
    lat, why = detect([pixels(4, g) for _ in range(4)])
    assert why == "" and lat.levels == (256, 256, 256)
    assert lat.step == pytest.approx([1 / (255 * s) for s in (0.229, 0.224, 0.225)], rel=1e-5)
    assert lat.low == pytest.approx([-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))], rel=1e-5)
    assert detect([torch.randn(4, 3, 16, 16)])[0] is None
    lat, why = detect([torch.randn(4, 3, 16, 16)])
    assert "channel 0" in why
    assert detect([torch.randn(4, 16)])[1] == "the model does not take one 4-D float tensor"


def test_aligned_float_graph_computes_the_same_function_borders_included():
    from qcompile.passes.capture import capture
    g = torch.Generator().manual_seed(1)
    m = stem_net()
    x = pixels(2, g)
    gm = capture(m, (x,))
    lat, _ = detect([pixels(4, g) for _ in range(4)])
    assert AlignInputLattice(lat)(gm).modified
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.constant_pad_nd.default in targets  # the conv's padding now pads x (zeros), not x'
    with torch.no_grad():
        assert sqnr(m(x), gm(x)) > 100
        assert torch.equal(m[0].weight, stem_net()[0].weight)  # the user's model is not touched


@pytest.mark.parametrize("backend", ["x86", "onnx", "executorch"])
def test_first_conv_reads_the_input_exactly_and_backends_agree(backend):
    g = torch.Generator().manual_seed(2)
    m = stem_net()
    cal, val = [pixels(4, g, 64) for _ in range(8)], [pixels(4, g, 64) for _ in range(3)]
    exact = qcompile.compile(m, (val[0],), backend, calibration=cal, verify=False, progress=False,
                             algorithm=["exact_input"], strict=True)
    plain = qcompile.compile(m, (val[0],), backend, calibration=cal, verify=False, progress=False, algorithm="rtn")
    rep = exact.report.algorithms["exact_input"]
    assert rep["levels"] == [256, 256, 256] and rep["input"]
    ref = exact.reference
    q = next(n for n in ref.graph.nodes if n.target == qd.quantize_per_tensor.default)
    assert q.args[0].target == torch.ops.aten.add.Tensor and float(q.args[1]) == 1.0  # scale 1: x' integers
    rows = {r.op: r for r in exact.report.rows if r.status == A.FLOAT_EXACT_INPUT}
    assert set(rows) == {"constant_pad_nd", "mul", "add"} and all(r.reason for r in rows.values())
    assert exact.report.float_nodes() == plain.report.float_nodes()  # no fallback added
    x = val[0]
    e, p = _values(ref, x), _values(plain.reference, x)
    xp, dq = e["add_tensor"], e["dequantize_per_tensor_default"]
    assert float((dq - xp)[..., 1:-1, 1:-1].abs().max()) < 1e-3  # every pixel exact (the pad's zeros are not)
    plain_in = p["dequantize_per_tensor_default"]
    assert float((plain_in - x).abs().max()) > 0.4 * float(plain.reference.graph.find_nodes(
        op="call_function", target=qd.quantize_per_tensor.default)[0].args[1])  # the unaligned grid: ~half a step
    with torch.no_grad():
        stem = m[1](m[0](x))
        gain = float(sqnr(stem, e["conv2d"]) - sqnr(stem, p["conv2d"]))
        parity = min(float(sqnr(exact.reference(v), exact(v))) for v in val)
    assert gain > 2.0  # the stem's output, once its input is exact: only its weights' rounding is left
    assert parity > 40.0  # the runtime computes what the reference graph does


def _values(gm, x) -> dict:
    """Every node's value when ``gm`` runs on ``x``."""
    from qcompile.ir import record_values
    return record_values(gm, (x,), [n.name for n in gm.graph.nodes])


def test_inputs_off_the_lattice_are_left_alone_and_a_named_request_says_why():
    g = torch.Generator().manual_seed(3)
    m = stem_net()
    cal = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(8)]
    art = qcompile.compile(m, (cal[0],), "x86", calibration=cal, verify=False, progress=False)
    assert "exact_input" not in art.report.algorithms
    assert not any(r.status == A.FLOAT_EXACT_INPUT for r in art.report.rows)
    named = qcompile.compile(m, (cal[0],), "x86", calibration=cal, verify=False, progress=False,
                             algorithm=["exact_input"])
    assert "not on a lattice" in named.report.algorithms["exact_input"]["skipped"]


def test_exact_input_is_a_default_on_lattice_inputs_and_rtn_turns_it_off():
    """algorithm=None applies it where every calibration input is an 8-bit pixel lattice; "rtn" (every default
    off) does not; the step-by-step API, which captures before it sees data, does not either (documented)."""
    g = torch.Generator().manual_seed(4)
    m = stem_net()
    cal = [pixels(4, g, 32) for _ in range(8)]
    default = qcompile.compile(m, (cal[0],), "x86", calibration=cal, verify=False, progress=False)
    assert default.report.algorithms["exact_input"]["levels"] == [256, 256, 256]
    assert any(r.status == A.FLOAT_EXACT_INPUT for r in default.report.rows)
    rtn = qcompile.compile(m, (cal[0],), "x86", calibration=cal, verify=False, progress=False, algorithm="rtn")
    assert "exact_input" not in rtn.report.algorithms
    stepwise = qcompile.convert(qcompile.prepare(m, (cal[0],), backend="x86").calibrate(cal))
    assert "exact_input" not in stepwise.report.algorithms
    with torch.no_grad():  # the defaults (exact input among them) end closer to float than plain PTQ
        x = pixels(4, g, 32)
        assert sqnr(m(x), default(x)) > sqnr(m(x), rtn(x))
