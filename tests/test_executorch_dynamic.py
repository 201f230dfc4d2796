"""ExecuTorch dynamic mode: linears run XNNPACK's dynamically quantized fully-connected (int8 weights per
channel, input rows quantized at run time); everything else stays float."""
import os

import pytest
import torch
from torch import nn

import qcompile
from qcompile import ActivationSpec, WeightSpec
from qcompile import annotation as A
from qcompile.errors import ConfigError
from qcompile.qparams import sqnr

import _zoo as zoo

pytest.importorskip("executorch")

qd = torch.ops.quantized_decomposed
DYNAMIC_KERNEL = "XNNPACK int8 dynamic linear (qd8: input quantized per row at run time)"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small models on a shared 2-core machine
    yield
    torch.set_num_threads(before)


def mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 32)).eval()
    for lin in (m[0], m[3]):
        nn.init.normal_(lin.weight, 0, 0.05)
    return m


X = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))


def dynamic(model, inputs, **kw):
    return qcompile.compile(model, inputs, backend="executorch", mode="dynamic", progress=False, **kw)


@pytest.fixture(scope="module")
def mlp_art():
    m = mlp()
    return m, dynamic(m, (X,))


@pytest.fixture(scope="module")
def encoder_art():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = zoo.demo_shapes.bert_encoder_shaped(vocab=100, hidden=32, layers=1, heads=2, intermediate=64,
                                                    max_len=32).eval()
    inputs = _tokens(seed=0)
    return model, inputs, dynamic(model, inputs)


def _tokens(seed, batch=2, seq=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 4:] = 0
    return ids, mask


def _rows(art, op):
    return [r for r in art.report.rows if r.op == op]


def test_mlp_linears_are_dynamic_int8_and_the_rest_float(mlp_art):
    m, art = mlp_art
    lin = _rows(art, "linear")
    assert [(r.status, r.kernel) for r in lin] == [(A.INT8, DYNAMIC_KERNEL)] * 2
    gelu, norm = _rows(art, "gelu")[0], _rows(art, "layer_norm")[0]
    assert gelu.status != A.INT8 and gelu.kernel == "XNNPACK fp32 gelu" and "FP32-only" in gelu.reason
    assert norm.status != A.INT8 and norm.kernel.startswith("portable") and "layer_norm" in norm.reason
    # no calibration: the reference graph quantizes each row when it runs, as XNNPACK does (qd8)
    targets = [n.target for n in art.reference.graph.nodes]
    assert targets.count(qd.choose_qparams_per_token_asymmetric.default) == 2
    assert qd.quantize_per_tensor.default not in targets


def test_mlp_linears_are_delegated_to_xnnpack(mlp_art):
    _, art = mlp_art
    v = art.report.verify
    assert v["delegated_conv_linear_share"] == 1.0 and v["int8_conv_linear_share"] == 1.0
    assert v["xnnpack_int8_nodes"] == 2
    by_op = v["delegation"]["by_operator"]
    assert by_op["aten_linear_default"] == (2, 0)  # (delegated, not delegated)
    assert by_op["quantized_decomposed_choose_qparams_per_token_asymmetric_default"] == (2, 0)
    assert v["int8_weight_share"] == 1.0  # the weights are int8 in the program, not dequantized to fp32


def test_mlp_numerics(mlp_art):
    m, art = mlp_art
    v = art.report.verify
    # measured: 40.6 dB vs float; runtime vs reference 55-57 dB (same per-row qparams; a code may differ by
    # one step where XNNPACK's fp32 scale rounds a tie the other way)
    assert v["sqnr_vs_float_db"] > 37
    assert v["sqnr_vs_reference_db"] > 45 and v["within_one_step"] == 1.0
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(7))
    x[0, 0] *= 50  # one loud token: XNNPACK quantizes each row on its own, and so does the reference graph
    with torch.no_grad():
        assert sqnr(m(x), art(x)) > 37
        assert sqnr(art.run_reference(x), art(x)) > 45


def test_pte_file_runs_in_executorch_runtime_and_qc_file_round_trips(mlp_art, tmp_path):
    from executorch.runtime import Runtime
    _, art = mlp_art
    path = art.save(str(tmp_path / "mlp.pte"))
    assert os.path.getsize(path) == art.lowered.pte_bytes
    program = Runtime.get().load_program(path)
    assert torch.equal(program.load_method("forward").execute([X])[0], art(X))
    loaded = qcompile.load(art.save(str(tmp_path / "mlp.qc")))  # the reference graph, lowered again
    assert torch.equal(loaded(X), art(X))
    assert [r.kernel for r in loaded.report.rows] == [r.kernel for r in art.report.rows]


def test_per_tensor_weights_are_stored_per_channel_for_xnnpack():
    m = mlp()
    art = dynamic(m, (X,), weights=WeightSpec(bits=8, granularity="per_tensor"))
    assert [r.kernel for r in _rows(art, "linear")] == [DYNAMIC_KERNEL] * 2
    assert art.report.verify["sqnr_vs_reference_db"] > 45  # measured 55.5
    assert art.report.verify["sqnr_vs_float_db"] > 30


@pytest.mark.parametrize("acts", [ActivationSpec(granularity="per_tensor"),
                                  ActivationSpec(granularity="per_token", symmetric=True)])
def test_activation_forms_xnnpack_does_not_run_are_config_errors(acts):
    with pytest.raises(ConfigError, match="per row at run time"):
        dynamic(mlp(), (X,), activations=acts)


def test_weights_xnnpack_has_no_dynamic_kernel_for_are_a_config_error():
    with pytest.raises(ConfigError, match="weights bits=6"):
        dynamic(mlp(), (X,), weights=WeightSpec(bits=6))


def test_group_wise_4bit_weights_run_xnnpack_qb4w_with_bf16_scales():
    m = mlp()
    art = dynamic(m, (X,), weights=WeightSpec(bits=4, granularity="per_group", group_size=32))
    assert [r.kernel for r in _rows(art, "linear")] == [
        DYNAMIC_KERNEL + " (4-bit weights packed two per byte, groups of 32: XNNPACK qb4w)"] * 2
    assert art.report.sizes["int4_packed_weight_elements"] == 64 * 128 + 128 * 32
    scales = [n for n in art.reference.graph.nodes if n.target == qd.dequantize_per_channel_group.default]
    assert len(scales) == 2
    for dq in scales:  # the reference uses the bf16 scales the program stores
        s = getattr(art.reference, dq.args[1].target)
        assert torch.equal(s, s.to(torch.bfloat16).float())
    v = art.report.verify
    assert v["sqnr_vs_reference_db"] > 45 and v["within_one_step"] == 1.0  # measured 52 dB
    assert v["sqnr_vs_float_db"] > 14


@pytest.mark.parametrize("weights,match", [
    (WeightSpec(bits=8, granularity="per_group", group_size=32), "4-bit only"),
    (WeightSpec(bits=4, granularity="per_group", group_size=16), "multiple of 32"),
    (WeightSpec(bits=4, granularity="per_group", group_size=96), "does not divide the 64 input features of linear"),
])
def test_group_sizes_xnnpack_cannot_run_are_config_errors(weights, match):
    with pytest.raises(ConfigError, match=match):
        dynamic(mlp(), (X,), weights=weights)


def test_4bit_weights_are_packed_for_xnnpack_qc4w():
    m = mlp()
    art = dynamic(m, (X,), weights=WeightSpec(bits=4))
    assert [r.kernel for r in _rows(art, "linear")] == [
        DYNAMIC_KERNEL + " (4-bit weights packed two per byte: XNNPACK qc4w)"] * 2
    assert art.report.sizes["int4_packed_weight_elements"] == 64 * 128 + 128 * 32
    v = art.report.verify
    assert v["sqnr_vs_reference_db"] > 45 and v["within_one_step"] == 1.0  # measured ~131 dB
    assert v["sqnr_vs_float_db"] > 14  # measured 16.8 dB (4-bit weights; 8-bit: 40.6 dB)


def test_encoder_linears_dynamic_attention_and_norms_float(encoder_art):
    model, inputs, art = encoder_art
    lin = _rows(art, "linear")
    assert len(lin) == 6 and all(r.status == A.INT8 and r.kernel == DYNAMIC_KERNEL for r in lin)
    assert all(r.status != A.INT8 for r in _rows(art, "matmul") + _rows(art, "softmax") + _rows(art, "layer_norm"))
    assert all(r.kernel.startswith("portable") for r in _rows(art, "embedding"))
    v = art.report.verify
    assert v["int8_conv_linear_share"] == 1.0 and v["xnnpack_int8_nodes"] == 6
    # measured: 37.2 dB vs float on held-out tokens; runtime within float rounding of the reference
    assert v["sqnr_vs_reference_db"] > 60
    ids, mask = _tokens(seed=9)
    with torch.no_grad():
        assert sqnr(model(ids, mask), art(ids, mask)) > 33


def test_other_batch_sizes_and_non_contiguous_inputs_match_the_reference(mlp_art):
    m, art = mlp_art
    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(5, 5, 64, generator=g),                      # batch 5: slices of the compiled batch
              torch.randn(2, 64, 5, generator=g).transpose(1, 2)):     # non-contiguous (copied when called)
        with torch.no_grad():
            assert sqnr(art.run_reference(x), art(x)) > 45  # measured ~132 dB
            assert sqnr(m(x), art(x)) > 37


def test_explain_predicts_the_dynamic_linears():
    report = qcompile.explain(mlp(), (X,), backend="executorch", mode="dynamic")
    assert {r.name: r.status for r in report.rows if r.op == "linear"} == {"linear": A.INT8, "linear_1": A.INT8}
    assert all(r.status != A.INT8 for r in _rows_of(report, "gelu") + _rows_of(report, "layer_norm"))


def _rows_of(report, op):
    return [r for r in report.rows if r.op == op]
