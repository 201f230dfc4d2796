"""Int8 linears whose consumers are all float keep an fp32 output (passes/float_output.py, x86 lowering)."""
import pytest
import torch
from torch import nn

import qcompile

KERNEL = "quantized::linear_with_input_q_dq_qweight_dq_output_fp32"


class Block(nn.Module):
    """Pre-norm residual FFN: LN -> linear -> relu -> linear -> view/transpose -> + residual (float add) -> head."""

    def __init__(self, d=32):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        b, t, d = x.shape
        h = self.fc2(torch.relu(self.fc1(self.ln(x))))
        x = x + h.view(b, t, 2, d // 2).transpose(1, 2).transpose(1, 2).reshape(b, t, d)
        return self.head(x)


class Chain(nn.Module):
    """linear -> relu -> linear -> tanh: fc2's output rounding is a large share of the error."""

    def __init__(self, d=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return torch.tanh(self.fc2(torch.relu(self.fc1(x))))


def _sqnr(ref, out):
    return (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()


def _compile(model, float_outputs: bool):
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(4, 16, 32, generator=g) for _ in range(8)]
    x = torch.randn(4, 16, 32, generator=g)
    art = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal,
                           backend_options={"engine": "x86", "float_output_linears": float_outputs})
    return x, art


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    model = Block().eval()
    return _compile(model, True)[1], _compile(model, False)[1]


def _row(art, module):
    (row,) = [r for r in art.report.rows if r.op == "linear" and r.module.endswith(module)]
    return row


def test_linear_feeding_the_residual_add_runs_int8_with_fp32_output(block):
    on, off = block
    assert _row(on, "fc2").status == "int8" and _row(on, "fc2").kernel.startswith(KERNEL)
    # fc1 -> relu still requantizes: its consumer fc2 takes int8; with the option off fc2 requantizes too
    assert _row(on, "fc1").kernel.startswith("quantized::linear_relu")
    assert _row(off, "fc2").kernel.startswith("quantized::linear (")
    views = [r for r in on.report.rows if r.op in ("reshape", "permute")]
    assert len(views) == 4 and all(r.status == qcompile.annotation.FLOAT_FEEDS_FLOAT for r in views)
    targets = [str(n.target) for n in on.lowered.gm.graph.nodes if n.op == "call_function"]
    assert sum(KERNEL.split("::")[1] in t for t in targets) == 2
    assert sum("dequantize" in t for t in targets) == 1  # fc2's input (from linear_relu's int8 output)
    # the head takes the residual sum as it is: no quantize node for it (its kernel quantizes), only LN's
    assert sum("quantize_per_tensor" in t for t in targets) == 1


def test_model_output_linear_is_int8_compute_either_way(block):
    for art in block:  # quantize_outputs=False (x86 default): the head's logits are not rounded
        head = _row(art, "head")
        assert head.status == "int8" and head.kernel.startswith(KERNEL)
        assert art.report.share("macs") == 1.0


def test_fp32_output_agrees_with_reference_and_is_closer_to_float():
    torch.manual_seed(0)
    model = Chain().eval()
    (x, on), (_, off) = _compile(model, True), _compile(model, False)
    with torch.no_grad():
        ref, lowered = model(x), on(x)
        # the kernel quantizes its input with the reference's parameters: agreement to float rounding
        assert _sqnr(on.reference(x), lowered) > 80
        s_on, s_off = _sqnr(ref, lowered), _sqnr(ref, off(x))
    assert s_on > s_off + 1.0, (s_on, s_off)  # one rounding step fewer (measured 37.3 vs 35.6 dB)


def test_onnx_leaves_them_unrounded():
    """ONNX: no Q after such a linear. ORT runs its MatMul as MatMulIntegerToFloat either way (the bias Add
    sits between MatMul and Q); what changes is the rounding of the result and the int8 views after it."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Block().eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(4, 16, 32, generator=g) for _ in range(8)]
    on = qcompile.compile(model, (cal[0],), backend="onnx", calibration=cal)
    off = qcompile.compile(model, (cal[0],), backend="onnx", calibration=cal,
                           backend_options={"float_output_linears": False})
    assert _row(on, "fc2").status == "int8" and _row(on, "head").status == "int8"
    ops_on, ops_off = on.report.verify["ort_int8_ops"], off.report.verify["ort_int8_ops"]
    assert ops_on == {"MatMulIntegerToFloat": 3} and ops_off.get("Reshape") == 2  # views on fc2's int8 output
    torch.manual_seed(0)
    chain = Chain().eval()
    s = {}
    for flag in (True, False):
        art = qcompile.compile(chain, (cal[0],), backend="onnx", calibration=cal,
                               backend_options={"float_output_linears": flag})
        with torch.no_grad():
            s[flag] = _sqnr(chain(cal[1]), art(cal[1]))
    assert s[True] > s[False] + 1.0, s


class Parallel(nn.Module):
    """Phi's parallel block: attention and MLP outputs added, then the float residual stream."""

    def __init__(self, d=32):
        super().__init__()
        self.ln, self.fa, self.fb = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        return x + (self.fa(h) + self.fb(h))


@pytest.mark.parametrize("backend", ["x86", "onnx"])
def test_int8_add_feeding_only_float_runs_float_and_its_linears_write_fp32(backend):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Parallel().eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(4, 16, 32, generator=g) for _ in range(8)]
    x = torch.randn(4, 16, 32, generator=g)
    opts = {"engine": "x86"} if backend == "x86" else {}
    on = qcompile.compile(model, (cal[0],), backend=backend, calibration=cal, backend_options=opts)
    off = qcompile.compile(model, (cal[0],), backend=backend, calibration=cal,
                           backend_options={**opts, "float_output_linears": False})
    adds = {r.name: r for r in on.report.rows if r.op == "add"}
    inner = [r for r in adds.values() if r.status == qcompile.annotation.FLOAT_FEEDS_FLOAT]
    assert len(inner) == 1 and "every consumer is float" in inner[0].reason
    assert [r.status for r in off.report.rows if r.op == "add"].count("int8") == 1  # the old plan
    for m in ("fa", "fb"):
        assert _row(on, m).status == "int8"
        if backend == "x86":
            assert _row(on, m).kernel.startswith(KERNEL)
    with torch.no_grad():
        ref = model(x)
        s_on, s_off = _sqnr(ref, on(x)), _sqnr(ref, off(x))
        assert _sqnr(on.reference(x), on(x)) > 40
    assert s_on > s_off + 1.0, (s_on, s_off)  # three roundings fewer: both linears' outputs and the sum


class ConvNeXtish(nn.Module):
    """Depthwise conv -> permute -> LayerNorm (float) -> back, and a last conv feeding the model output."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw, self.ln, self.head = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c), nn.Conv2d(c, 5, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.ln(self.dw(h).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(torch.relu(h))


def test_conv_feeding_float_ops_runs_int8_with_fp32_output():
    from qcompile.backends.x86.rules import CONV_FLOAT_OUTPUT_KERNEL, conv_float_output_available
    if not conv_float_output_available():
        pytest.skip("torch built without oneDNN")
    torch.manual_seed(0)
    model = ConvNeXtish().eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(6)]
    x = torch.randn(2, 3, 16, 16, generator=g)
    on = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal)
    off = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal,
                           backend_options={"float_output_linears": False})
    rows = {r.module.split(".")[-1]: r for r in on.report.rows if r.op == "conv2d"}
    for name in ("dw", "head"):  # dw feeds a permute + LayerNorm; head the model output
        assert rows[name].status == "int8" and rows[name].kernel.startswith(CONV_FLOAT_OUTPUT_KERNEL), rows[name]
    assert not rows["stem"].kernel.startswith(CONV_FLOAT_OUTPUT_KERNEL)  # its consumers are int8
    assert on.report.share("macs") == 1.0
    with torch.no_grad():
        ref = model(x)
        assert _sqnr(on.reference(x), on(x)) > 60  # the kernel computes on the reference's int8 values
        s_on, s_off = _sqnr(ref, on(x)), _sqnr(ref, off(x))
    assert s_on > s_off + 0.5, (s_on, s_off)


def _dw_codes(art) -> tuple[int, int]:
    """(largest |code|, largest sum of two same-sign codes of one channel) of the depthwise conv's weights."""
    from qcompile.ir import get_attr_value
    (conv,) = [n for n in art.reference.graph.nodes if n.target == torch.ops.aten.conv2d.default
               and int(n.args[6] if len(n.args) > 6 else 1) > 1]  # the depthwise conv
    w = get_attr_value(art.reference, conv.args[1].args[0]).reshape(16, -1).int()
    top = lambda v: v.clamp(min=0).sort(dim=1).values[:, -2:].sum(dim=1)  # noqa: E731
    return int(w.abs().max()), int(torch.maximum(top(w), top(-w)).max())


def test_fp32_output_depthwise_conv_takes_full_range_weights_where_onednn_sums_in_int32():
    """fbgemm's depthwise kernel needs the pair-sum bound (two same-sign codes <= 128); a depthwise conv on
    oneDNN's fp32-output kernel with VNNI does not: its codes reach 127 with a second one beside it."""
    from qcompile.backends.x86.kernel_choice import cpu_has_vnni
    from qcompile.backends.x86.rules import conv_float_output_available
    torch.manual_seed(0)
    model = ConvNeXtish().eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(4)]
    on = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal)
    off = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal,  # int8 output, fbgemm-eligible
                           backend_options={"float_output_linears": False, "depthwise_full_range": False})
    pair = _dw_codes(off)
    assert pair[1] <= 128  # fbgemm's bound (u8 x s8 pairs in int16)
    full = _dw_codes(on)
    if conv_float_output_available() and cpu_has_vnni():
        assert full[0] >= 127 and full[1] > 128, full
    else:
        assert full == pair
