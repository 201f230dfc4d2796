"""End-to-end static int8 on the x86 backend over the model zoo: SQNR vs float, agreement of the
lowered kernels with the reference graph, and exactly which nodes fell back."""
import pytest
import torch
from torch import nn

import qcompile
import _zoo as zoo
from qcompile.backends.x86.verify import layer_agreement
from qcompile.qparams import sqnr


def _gauss(n, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = zoo.resnet18_shaped().eval()
    cal, (x,) = _gauss(4, (2, 3, 112, 112), 1), _gauss(1, (2, 3, 112, 112), 2)
    return model, x, qcompile.compile(model, (x,), backend="x86", calibration=cal, progress=False)


@pytest.fixture(scope="module")
def mobilenet():
    model = zoo.make_mobilenet_v2(seed=0, res=96)
    cal, x = zoo.image_batches(4, batch=2, res=96, seed=1), zoo.image_batches(1, batch=2, res=96, seed=2)[0]
    return model, x, qcompile.compile(model, (x,), backend="x86", calibration=cal, progress=False)


def test_resnet_sqnr_and_parity(resnet):
    model, x, art = resnet
    with torch.no_grad():
        assert sqnr(model(x), art(x)) >= 30.0
    assert art.report.verify["sqnr_vs_float_db"] >= 30.0
    # parity is judged on quantized outputs, whose step is the real output quantization step
    cal = _gauss(4, (2, 3, 112, 112), 1)
    art_q = qcompile.compile(model, (x,), backend="x86", calibration=cal, progress=False, quantize_outputs=True)
    assert art_q.report.verify["within_one_step"] >= 0.99
    layers = layer_agreement(art_q.reference, art_q.lowered, (x,), {})
    assert len(layers) > 25 and min(r["within_one_step"] for r in layers[:6]) >= 0.999  # before cascading


def test_resnet_every_conv_is_int8(resnet):
    _, _, art = resnet
    rows = art.report.rows
    assert art.report.float_nodes() == {}
    convs = [r for r in rows if r.op == "conv2d"]
    assert len(convs) == 20 and all(r.status == "int8" and r.kernel.startswith("quantized::conv2d") for r in convs)
    (fc,) = [r for r in rows if r.op == "linear"]
    # logits are not rounded by default (quantize_outputs=False): int8 GEMM with an fp32 output
    assert fc.status == "int8" and fc.kernel.startswith("quantized::linear_with_input_q_dq_qweight_dq_output_fp32")
    assert art.report.share("macs") == 1.0


def test_resnet_lowered_graph_has_no_qdq_between_int8_ops(resnet):
    _, _, art = resnet
    targets = [str(n.target) for n in art.lowered.gm.graph.nodes if n.op == "call_function"]
    assert sum("quantize_per_tensor" in t for t in targets) == 1  # only the model input
    assert sum("dequantize" in t for t in targets) == 1  # only before the fc (its kernel requantizes exactly)
    assert any("add_relu" in t for t in targets) and any("conv2d_relu" in t for t in targets)


def test_mobilenet_depthwise_hardswish_se(mobilenet):
    model, x, art = mobilenet
    with torch.no_grad():
        assert sqnr(model(x), art(x)) >= 30.0
    assert art.report.float_nodes() == {}
    kernels = {r.kernel for r in art.report.rows}
    assert "int8 lookup table (hardswish.default)" in kernels and "quantized::mul" in kernels
    layers = layer_agreement(art.reference, art.lowered, (x,), {})
    assert min(r["within_one_step"] for r in layers[:8]) >= 0.999  # before rounding flips cascade
    assert min(r["within_one_step"] for r in layers) >= 0.97  # cascaded over 50+ layers (0.979 measured)
    assert art.report.verify["within_one_step"] >= 0.97


def _depthwise_codes(art):
    """(int codes [C, k*k], quant range) of every depthwise conv weight in the reference graph."""
    from qcompile.ir import get_attr_value
    dq = torch.ops.quantized_decomposed.dequantize_per_channel.default
    out = []
    for n in art.reference.graph.nodes:
        user = next(iter(n.users), None) if n.target == dq else None
        if user is None or (user.args[6] if len(user.args) > 6 else 1) == 1:
            continue
        out.append((get_attr_value(art.reference, n.args[0]).flatten(1).to(torch.int32), (n.args[4], n.args[5])))
    return out


def _max_pair(q):
    return int(torch.maximum(q.clamp(min=0).topk(2, 1).values.sum(1), (-q).clamp(min=0).topk(2, 1).values.sum(1)).max())


def _full_range_depthwise_here() -> bool:
    from qcompile.backends.x86.kernel_choice import available_families, cpu_has_vnni
    from qcompile.backends.x86.rules import conv_float_output_available
    return conv_float_output_available() and cpu_has_vnni() and "onednn" in available_families()


def test_depthwise_weight_codes_cannot_saturate_the_int16_pair_sums(mobilenet):
    """fbgemm's depthwise kernel adds two u8 x s8 products in int16 (even on VNNI): any two same-sign codes of
    a channel must sum to <= 128 (255 * 128 <= 32767). With depthwise_full_range=False (and by default on a
    CPU without VNNI) the pair_sum range keeps that with finer steps than 7-bit codes (|code| <= 64), and the
    kernel agrees with the reference."""
    model, x, default = mobilenet
    cal = zoo.image_batches(4, batch=2, res=96, seed=1)
    art = qcompile.compile(model, (x,), backend="x86", calibration=cal, progress=False,
                           backend_options={"depthwise_full_range": False})
    for art_ in ([art] if _full_range_depthwise_here() else [art, default]):
        codes = _depthwise_codes(art_)
        assert len(codes) >= 3
        for q, qrange in codes:
            assert _max_pair(q) <= 128 and qrange == (-128, 127)
            assert int(q.abs().max()) > 64  # finer than 7-bit codes somewhere in every layer
    assert art.report.verify["within_one_step"] >= 0.97


def test_depthwise_weights_take_the_full_range_on_onednn_where_its_sums_are_exact(mobilenet):
    """On a VNNI CPU (oneDNN's int8 conv sums in int32) every int8 depthwise conv gets full-range 8-bit
    weights, packed for oneDNN whatever the engine choice, and the kernels agree with the reference as the
    pair_sum ones do. Without VNNI the default is the pair_sum range (test above)."""
    if not _full_range_depthwise_here():
        pytest.skip("no VNNI / oneDNN here: depthwise weights keep the pair_sum range (tested above)")
    model, x, art = mobilenet
    codes = _depthwise_codes(art)
    assert len(codes) >= 3 and all(int(q.abs().max()) >= 127 for q, _ in codes)  # min/max: the end of the range
    assert any(_max_pair(q) > 128 for q, _ in codes)  # beyond what fbgemm's int16 pairs hold
    rows = [r for r in art.report.rows if r.op == "conv2d" and "full-range" in r.kernel]
    assert len(rows) == len([c for c in codes if _max_pair(c[0]) > 128]) and all("onednn" in r.kernel for r in rows)
    layers = layer_agreement(art.reference, art.lowered, (x,), {})
    assert min(r["within_one_step"] for r in layers[:8]) >= 0.999
    assert art.report.verify["within_one_step"] >= 0.97
    with torch.no_grad():
        assert sqnr(model(x), art(x)) >= 30.0
    # engine="fbgemm" asks for fbgemm's depthwise kernel: its int16 pair sums need the pair_sum range
    fb = qcompile.compile(model, (x,), backend="x86", calibration=zoo.image_batches(4, batch=2, res=96, seed=1),
                          progress=False, backend_options={"engine": "fbgemm"}, algorithm="rtn")
    assert all(_max_pair(q) <= 128 for q, _ in _depthwise_codes(fb))
    assert fb.report.verify["within_one_step"] >= 0.97


def test_bert_encoder_fallbacks_are_exactly_expected():
    model, example = zoo.get_model("bert_encoder")
    g = torch.Generator().manual_seed(3)
    cal = [(torch.randint(0, 1000, (2, 32), generator=g), torch.ones(2, 32, dtype=torch.long)) for _ in range(4)]
    art = qcompile.compile(model, example, backend="x86", calibration=cal, progress=False)
    float_ops = {r.op for r in art.report.rows if r.status.startswith("float: unsupported")}
    assert {"layer_norm", "softmax", "gelu", "embedding"} <= float_ops
    assert all(r.status == "int8" for r in art.report.rows if r.op == "linear")
    attention = [r for r in art.report.rows if r.op == "matmul"]  # 32 tokens: fp32 (X86Options.attention="auto")
    assert attention and all(r.status.startswith("float") and "'attention': 'int8'" in r.reason for r in attention)
    assert art.report.verify["within_one_step"] >= 0.99
    assert art.report.verify["sqnr_vs_float_db"] >= 25.0
    assert all(art.report.float_nodes()[n] for n in art.report.float_nodes())  # every fallback has a reason


def test_digits_int8_accuracy_within_one_point():
    model, (x_tr, _, x_te, y_te) = zoo.train_digits_cnn()
    art = qcompile.compile(model, (x_te[:8],), backend="x86", calibration=[x_tr[i:i + 64] for i in range(0, 512, 64)],
                           progress=False)
    acc_f, acc_q = zoo.accuracy(model, x_te, y_te), zoo.accuracy(art, x_te, y_te)
    assert acc_f >= 0.95
    assert acc_q >= acc_f - 0.01


def test_real_transformers_bert_captures_and_quantizes():
    model, tok = zoo.load_minilm()
    enc = tok(zoo.SENTENCES[:8], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    example = (enc["input_ids"], enc["attention_mask"])
    report = qcompile.explain(model, example, backend="x86")
    linears = [r for r in report.rows if r.op == "linear"]
    assert len(linears) == 6 * 6 + 1  # q, k, v, out, ffn1, ffn2 per layer + pooler
    cal = [example]
    art = qcompile.compile(model, example, backend="x86", calibration=cal, progress=False)
    emb_f = zoo.embed(model, tok, zoo.SENTENCES, max_length=32)
    emb_q = zoo.embed(art, tok, zoo.SENTENCES, max_length=32)
    cos = torch.nn.functional.cosine_similarity(emb_f, emb_q).min().item()
    assert cos >= 0.92  # static per-tensor activations; mode='dynamic' is the path for more (issue 5)
    assert all(r.status == "int8" for r in art.report.rows if r.op == "linear" and r.module.startswith("encoder"))


def test_input_quantize_native_by_default_exact_on_request(resnet):
    """The native quantize rounds x / scale (the reference: x * (1 / scale)): at most one step apart, on
    a tiny share of values; exact_quantize=True reproduces the reference's integers bit for bit."""
    model, x, art = resnet
    cal = _gauss(4, (2, 3, 112, 112), 1)
    exact = qcompile.compile(model, (x,), backend="x86", calibration=cal, progress=False, verify=False,
                             backend_options={"exact_quantize": True})
    targets = lambda a: [n.target for n in a.lowered.gm.graph.nodes if n.op == "call_function"]  # noqa: E731
    assert torch.quantize_per_tensor in targets(art) and torch.quantize_per_tensor not in targets(exact)
    (q,) = [n for n in art.reference.graph.nodes if n.target == torch.ops.quantized_decomposed.quantize_per_tensor.default
            and n.args[0].op == "placeholder"]
    ref_ints = q.target(x, *q.args[1:]).to(torch.int32)
    native = torch.quantize_per_tensor(x, float(q.args[1]), int(q.args[2]), torch.quint8).int_repr().to(torch.int32)
    diff = (native - ref_ints).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    with torch.no_grad():
        assert sqnr(art(x), exact(x)) > 40  # same model, one input step apart on a few values


def test_weights_quantized_for_vnni_run_in_float_on_a_cpu_without_it(mobilenet, tmp_path, monkeypatch):
    """A .qc compiled on a VNNI CPU (8-bit GEMM weights, full-range depthwise weights) and loaded on an AVX2-only
    one: there every int8 kernel adds u8 x s8 pairs in int16, so the groups whose codes could saturate it run in
    float, named in the report with the reason, and the outputs still match the reference graph."""
    from qcompile.backends.x86 import rules
    from qcompile.backends.x86.kernel_choice import cpu_has_vnni
    from qcompile.gptq import codes_break_pair_bound
    model, x, art = mobilenet
    path = str(tmp_path / "m.qc")
    art.save(path)
    monkeypatch.setattr(rules, "cpu_has_vnni", lambda: False)
    loaded = qcompile.load(path)
    dq = torch.ops.quantized_decomposed.dequantize_per_channel.default
    from qcompile.ir import get_attr_value
    wide = [n for n in art.reference.graph.nodes if n.target == dq
            and codes_break_pair_bound(get_attr_value(art.reference, n.args[0]))]
    refused = [r for r in loaded.report.rows if "weights quantized for a CPU with VNNI" in (r.reason or "")]
    if cpu_has_vnni():
        assert wide and len(refused) >= len(wide) // 2  # compiled here with VNNI: 8-bit codes, refused without it
        assert all(r.status.startswith("float") for r in refused)
    else:
        assert not wide and not refused  # compiled without VNNI: 7-bit / pair_sum codes run int8 anywhere
    with torch.no_grad():
        assert sqnr(art.reference(x), loaded(x)) >= 30.0


def test_grouped_conv_weights_widened_to_full_range_run_on_onednn():
    """The backend gives every grouped conv the pair_sum range and widens them all on VNNI; a grouped (not
    depthwise) conv with full-range codes must be packed for oneDNN too, never for fbgemm's int16 pairs."""
    if not _full_range_depthwise_here():
        pytest.skip("no VNNI / oneDNN here: grouped conv weights keep the pair_sum range")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(32, 8, 1)).eval()
    cal = [torch.randn(2, 16, 12, 12) for _ in range(4)]
    art = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal, progress=False, algorithm="rtn")
    row = next(r for r in art.report.rows if r.op == "conv2d" and r.module == "0")
    assert "onednn: full-range" in row.kernel
    layers = layer_agreement(art.reference, art.lowered, (cal[0],), {})
    assert min(r["within_one_step"] for r in layers) >= 0.999
