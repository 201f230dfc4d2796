"""Issue 11, breadth: constructs of architectures qcompile did not write compile, load and run on every
backend, from example inputs of any layout, and a lowering far from float never passes silently.

Each test reproduces one reported failure on a small model of tests/_breadth_models.py.
"""
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

import qcompile
from qcompile.qparams import sqnr

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: tests/ is not on sys.path
import _breadth_models as M  # noqa: E402

HAS_ET = importlib.util.find_spec("executorch") is not None
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
needs_et = pytest.mark.skipif(not HAS_ET, reason="executorch not installed")
_LAYOUTS = {"contiguous": lambda x: x, "channels_last": M.channels_last, "permuted": M.hwc_permuted}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_CACHE = {}


def _compile(name, backend, layout="contiguous", **options):
    """Compile model ``name`` for ``backend`` from an example in ``layout`` (cached per module run)."""
    key = (name, backend, layout, tuple(sorted(options.items())))
    if key not in _CACHE:
        torch.manual_seed(0)
        model, cal = getattr(M, name)().eval(), M.images()
        art = qcompile.compile(model, _LAYOUTS[layout](cal[0]), backend, calibration=cal, **options)
        _CACHE[key] = model, art
    return _CACHE[key]


def _sqnr_vs_float(model, art, layout="contiguous"):
    x = M.images(1, seed=7)[0]
    with torch.no_grad():
        return sqnr(model(x), art(_LAYOUTS[layout](x)))


# -- one canonical graph: channel shuffle and in-place ops compile everywhere ----------------------------
@pytest.mark.parametrize("backend", ["x86", pytest.param("executorch", marks=needs_et)])
def test_channel_shuffle_compiles_and_equals_float(backend):
    """Was: 'view size is not compatible with input tensor's size and stride' during calibration."""
    model, art = _compile("ChannelShuffle", backend)
    assert _sqnr_vs_float(model, art) > 30
    assert art.report.verify["sqnr_vs_reference_db"] > 40


@pytest.mark.parametrize("backend", ["x86", pytest.param("executorch", marks=[needs_et, pytest.mark.slow])])
def test_inplace_activations_and_dropout_compile_in_int8(backend):
    model, art = _compile("InplaceActs", backend)
    assert _sqnr_vs_float(model, art) > 35
    ops = {r.op for r in art.report.rows}
    assert "dropout" not in ops and not any(op.endswith("_") for op in ops)
    assert art.report.summary()["int8_mac_share"] > 0.99


# -- ExecuTorch: programs that compiled but failed to load or run -------------------------------------------
@needs_et
@pytest.mark.parametrize("name", ["ChunkCat", "SqueezeFire", "MultiCat"])
def test_executorch_cat_and_chunk_programs_load_and_run(name):
    """Was: chunk -> '2 input tensors have different dim orders' (execute() 0x12); cat of 2 or 4 branches
    -> 'XNNCompiler: Failed to create cat node' when the .pte was loaded."""
    model, art = _compile(name, "executorch")
    assert _sqnr_vs_float(model, art) > 30
    assert art.report.verify["within_one_step"] > 0.99
    assert art.report.summary()["int8_mac_share"] == 1.0


@needs_et
def test_executorch_program_that_cannot_load_fails_at_compile_time_naming_the_node(monkeypatch):
    from qcompile.backends.executorch import lower
    monkeypatch.setattr(lower, "requantize_cat_inputs", lambda gm: [])  # the lowering that made bad .pte files
    torch.manual_seed(0)
    model, cal = M.MultiCat().eval(), M.images(2)
    with pytest.raises(qcompile.QCompileError) as err:
        qcompile.compile(model, cal[0], "executorch", calibration=cal, verify=False)
    msg = str(err.value)
    assert "fails to load" in msg and "node: cat" in msg and "_breadth_models.py" in msg
    assert "exclude=" in msg and "backend=" in msg
    assert "xnn_status_invalid_parameter" in msg  # the runtime's own log line


@needs_et
@pytest.mark.parametrize("name", ["PadPoolStem", "MaxOverDims"])
def test_executorch_pad_and_max_dim_programs_load_and_run(name):
    """Was (BiT): a zero pad of an int8 value left float -> 'Failed to create StaticConstantPad node ...
    xnn_status_invalid_parameter' when the .pte was loaded; (Hiera) max(dim) without keepdim -> 'amax.default
    only supports keep_dim == True' in to_edge_transform_and_lower."""
    model, art = _compile(name, "executorch")
    assert _sqnr_vs_float(model, art) > 25
    assert art.report.verify["sqnr_vs_reference_db"] > 40
    assert art.report.summary()["int8_mac_share"] > 0.9


def test_executorch_rewrites_keep_values_and_only_touch_what_xnnpack_rejects():
    from qcompile.backends.executorch.rewrite import max_dim_for_xnnpack, requantize_float_pads
    q, dq = torch.ops.quantized_decomposed.quantize_per_tensor.default, torch.ops.quantized_decomposed.dequantize_per_tensor.default

    class Graph(torch.nn.Module):
        def forward(self, x):
            y = dq(q(x, 0.05, -3, -128, 127, torch.int8), 0.05, -3, -128, 127, torch.int8)
            zero = torch.ops.aten.constant_pad_nd.default(y, [1, 1, 1, 1], 0.0)
            off_grid = torch.ops.aten.constant_pad_nd.default(y, [1, 1, 1, 1], 0.01)  # not on the grid: left alone
            kept = torch.ops.aten.max.dim(y, 3, True)[0]  # what XNNPACK serializes: left alone
            return zero, off_grid, kept, torch.ops.aten.max.dim(y, 1)[0], torch.ops.aten.max.dim(y, 2)[0]

    x = torch.randn(2, 4, 5, 6)
    gm = torch.export.export(Graph(), (x,)).module()
    before = gm(x)
    assert len(requantize_float_pads(gm)) == 1
    assert len(max_dim_for_xnnpack(gm)) == 2
    after = gm(x)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.amax.default) == 1 and targets.count(torch.ops.aten.squeeze.dims) == 1
    assert targets.count(q) == 2


@needs_et
def test_executorch_op_without_a_kernel_fails_at_compile_time_naming_node_module_and_line():
    torch.manual_seed(0)
    model, cal = M.Spectral().eval(), [torch.randn(2, 8, 16) for _ in range(2)]
    with pytest.raises(qcompile.QCompileError) as err:
        qcompile.compile(model, cal[0], "executorch", calibration=cal, verify=False)
    msg = str(err.value)
    assert "cannot run aten._fft_c2c" in msg and "node: _fft_c2c" in msg and "_breadth_models.py" in msg
    assert "backend='x86' or 'onnx'" in msg


# -- coverage: constant-weight addmm / matmul are linear layers ------------------------------------------
@pytest.mark.parametrize("backend", ["x86", pytest.param("executorch", marks=[needs_et, pytest.mark.slow])])
def test_matmul_and_addmm_with_constant_weights_run_in_int8(backend):
    torch.manual_seed(0)
    model = M.MatmulMLP().eval()
    cal = [torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    art = qcompile.compile(model, cal[0], backend, calibration=cal)
    linears = [r for r in art.report.rows if r.op == "linear"]
    assert len(linears) == 3 and all(r.status == "int8" for r in linears)
    assert art.report.summary()["int8_mac_share"] == 1.0
    assert sqnr(model(cal[1]), art(cal[1])) > 25


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                                          bos_token_id=0, eos_token_id=0)
            self.gpt2 = transformers.GPT2Model(cfg)

        def forward(self, ids):
            return self.gpt2(ids).last_hidden_state

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return Hidden().eval(), [torch.randint(0, 100, (2, 8), generator=g) for _ in range(4)]


def _check_gpt2(backend):
    model, cal = _tiny_gpt2()
    art = qcompile.compile(model, cal[0], backend, calibration=cal)
    proj = [r for r in art.report.rows if r.op == "linear"]
    modules = {r.module.rsplit(".", 1)[-1] for r in proj}
    assert {"c_attn", "c_proj", "c_fc"} <= modules  # HF Conv1D, captured as addmm
    assert len(proj) == 8 and all(r.status == "int8" for r in proj), [(r.name, r.status, r.reason) for r in proj]
    # every MAC outside attention is int8; attention is fp32 on x86 at 8 tokens (X86Options.attention="auto")
    # and on ExecuTorch (XNNPACK's bmm is FP32-only), each row saying why
    attention = [r for r in art.report.rows if r.op == "scaled_dot_product_attention" and r.status != "int8"]
    why = {"x86": "in int8 only where that measured faster", "executorch": "XNNPACK has no int8 attention"}[backend]
    assert len(attention) == 2 and all(why in r.reason for r in attention), [r.reason for r in attention]
    total = sum(r.macs for r in art.report.rows)
    assert sum(r.macs for r in art.report.rows if r.status == "int8") / (total - sum(r.macs for r in attention)) > 0.99
    assert sqnr(model(cal[1]), art(cal[1])) > 25


def _compile_sequences(name, backend, shape):
    """Model ``name`` compiled for ``backend`` on 4 seeded random batches of ``shape``."""
    if backend == "onnx" and not HAS_ORT:
        pytest.skip("onnxruntime not installed")
    torch.manual_seed(0)
    model = getattr(M, name)().eval()
    cal = [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return model, cal, qcompile.compile(model, cal[0], backend, calibration=cal)


@pytest.mark.parametrize("backend", ["x86", "onnx"])
def test_projections_with_a_packed_bias_are_int8(backend):
    """Was (WavLM, x86): AttributeError in the linear rule, the bias being chunk(cat(biases))[i], not a constant.
    Constant folding now folds the chunk piece by piece, so the three projections are plain int8 linears."""
    model, cal, art = _compile_sequences("PackedBiasAttention", backend, (2, 6, 32))
    linears = [r for r in art.report.rows if r.op == "linear"]
    assert len(linears) == 4 and all(r.status == "int8" for r in linears)
    assert sqnr(model(cal[1]), art(cal[1])) > 25


def test_x86_linear_with_a_bias_computed_at_run_time_runs_float_with_the_reason():
    model, cal, art = _compile_sequences("RuntimeBias", "x86", (4, 16))
    row = next(r for r in art.report.rows if r.op == "linear")
    assert row.status.startswith("float") and "bias is computed at run time" in row.reason
    assert sqnr(model(cal[1]), art(cal[1])) > 30
    assert art.report.verify["sqnr_vs_reference_db"] > 60


@pytest.mark.parametrize("backend", ["x86", "onnx"])
def test_baddbmm_scores_are_a_bmm_every_backend_sees(backend):
    """Was (BLOOM, ONNX): the ALiBi score GEMM hid in baddbmm: float, 0 MACs in the report, where ORT's own
    quantizer runs it as an int8 MatMul."""
    model, cal, art = _compile_sequences("AlibiScores", backend, (2, 8, 32))
    assert not any(r.op == "baddbmm" for r in art.report.rows)
    gemms = [r for r in art.report.rows if r.op == "matmul"]
    assert len(gemms) == 2 and all(r.macs > 0 for r in gemms)
    if backend == "onnx":
        assert all(r.status == "int8" for r in gemms)
    assert sqnr(model(cal[1]), art(cal[1])) > 25


def test_gpt2_conv1d_projections_are_int8_on_x86():
    _check_gpt2("x86")


@needs_et
@pytest.mark.slow
def test_gpt2_conv1d_projections_are_int8_on_executorch():
    _check_gpt2("executorch")


# -- inputs of any layout -----------------------------------------------------------------------------------
_BACKENDS = ["x86", pytest.param("executorch", marks=needs_et),
             pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed"))]


@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
@pytest.mark.parametrize("backend", _BACKENDS)
def test_any_layout_example_and_call_equal_the_contiguous_copy(backend, layout):
    """Was (ExecuTorch): a channels-last example gave silently wrong programs (squeeze-fire 2.1 dB), a
    permuted one failed in XNNPACK's shape propagation."""
    model, art = _compile("SqueezeFire", backend, layout)
    _, plain = _compile("SqueezeFire", backend)
    x = M.images(1, seed=7)[0]
    expected = plain(x)
    for call_layout in _LAYOUTS.values():
        assert torch.equal(art(call_layout(x)), expected)
    assert _sqnr_vs_float(model, art, layout) > 30


@pytest.mark.parametrize("backend", _BACKENDS)
def test_a_batch_one_example_compiles_a_model_that_runs_any_batch(backend):
    """Was: compiled from one image, a model with ``x.view(x.size(0), -1)`` failed on a batch of 4 deep in a
    kernel (x86: 'The number of rows in the packB should be equal to K', ONNX Runtime: 'invalid dimensions'):
    torch.export had specialized the batch to 1. A batch-1 example is now traced as batch 2."""
    torch.manual_seed(0)
    model = M.FlattenHead().eval()
    cal = M.images(4, batch=1)
    art = qcompile.compile(model, cal[0], backend, calibration=cal)
    for batch in (1, 5):
        x = M.images(1, seed=11, batch=batch)[0]
        with torch.no_grad():
            y = art(x)
            assert y.shape == (batch, 10)
            assert sqnr(model(x), y) > 30 and sqnr(art.run_reference(x), y) > 40, (batch, backend)
    if backend == "onnx":
        assert art.report.verify["dynamic_batch"]


class _BatchBranch(torch.nn.Module):
    """Exports only with its batch fixed: a view that bakes in the batch, chosen by a branch on it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x).view(1, 4) if x.shape[0] == 1 else self.fc(x).view(8, 4)


def test_a_graph_captured_with_a_fixed_batch_refuses_other_batches_with_the_reason():
    torch.manual_seed(0)
    art = qcompile.compile(_BatchBranch().eval(), torch.randn(1, 8), "x86", calibration=[torch.randn(1, 8)] * 4)
    assert art(torch.randn(1, 8)).shape == (1, 4)
    with pytest.raises(qcompile.errors.InputError, match="batch fixed at 1.*compile with an example of the batch"):
        art(torch.randn(3, 8))


@needs_et
def test_executorch_vit_from_a_channels_last_example_equals_float():
    """Was: SQNR -2.9 dB, no error, no warning."""
    model, art = _compile("TinyViT", "executorch", "channels_last")
    assert _sqnr_vs_float(model, art, "channels_last") > 25
    assert not art.report.verify["far_from_float"]


# -- no silent wrong answers ----------------------------------------------------------------------------
def _broken_x86(monkeypatch):
    from qcompile.backends.x86.backend import X86Backend
    run = X86Backend.run

    def perturbed(self, lowered, args, kwargs):
        y = run(self, lowered, args, kwargs)
        return y + y.std() * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))

    monkeypatch.setattr(X86Backend, "run", perturbed)


def test_healthy_compile_is_not_flagged():
    _, art = _compile("SqueezeFire", "x86")
    assert art.report.verify["far_from_float"] is False and art.report.warnings == []
    assert "WARNING" not in str(art.report)


def test_lowering_far_from_float_warns_and_is_flagged(monkeypatch):
    _broken_x86(monkeypatch)
    torch.manual_seed(0)
    model, cal = M.SqueezeFire().eval(), M.images()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        art = qcompile.compile(model, cal[0], "x86", calibration=cal)
    ours = [w for w in caught if issubclass(w.category, qcompile.QuantizationWarning)]
    assert len(ours) == 1 and "x86 backend" in str(ours[0].message)
    v = art.report.verify
    assert v["far_from_float"] is True and v["sqnr_vs_float_db"] < 5 < 40 < v["reference_sqnr_vs_float_db"]
    assert f"{v['sqnr_vs_float_db']:.1f} dB" in art.report.warnings[0]
    assert "WARNING: x86 backend" in str(art.report)
    assert art.report.to_dict()["warnings"] == art.report.warnings


def test_lowering_far_from_float_raises_under_strict(monkeypatch):
    _broken_x86(monkeypatch)
    torch.manual_seed(0)
    model, cal = M.SqueezeFire().eval(), M.images()
    with pytest.raises(qcompile.NumericsError, match="strict=True: x86 backend: the lowered artifact is"):
        qcompile.compile(model, cal[0], "x86", calibration=cal, strict=True, allow_float={"cat"})


def test_far_from_float_thresholds():
    from qcompile.artifact import far_from_float
    assert far_from_float({"sqnr_vs_float_db": 30.0, "reference_sqnr_vs_float_db": 38.0}) is None
    assert "lowering" in far_from_float({"sqnr_vs_float_db": 20.0, "reference_sqnr_vs_float_db": 38.0})
    assert far_from_float({"sqnr_vs_float_db": 50.0, "reference_sqnr_vs_float_db": float("inf")}) is None
    assert "only 6.0 dB" in far_from_float({"sqnr_vs_float_db": 6.0, "reference_sqnr_vs_float_db": 7.0})
    assert far_from_float({"sqnr_vs_float_db": -float("inf"), "reference_sqnr_vs_float_db": -float("inf")}) is None
    assert far_from_float({"sqnr_vs_reference_db": 40.0}) is None  # loaded artifact: no float model to judge


@needs_et
def test_executorch_lowering_errors_quote_the_model_source_lines():
    from qcompile.backends.executorch.proof import model_frames
    err = ValueError("Cannot view a tensor with shape [2, 8, 64]\nWhile executing %view\nOriginal traceback:\n"
                     'File "/venv/lib/torch/fx/proxy.py", line 3, in create\n'
                     'File "/venv/transformers/models/gpt2/modeling_gpt2.py", line 225, in forward\n'
                     'File "/venv/transformers/pytorch_utils.py", line 119, in forward')
    text = model_frames(err)
    assert text.splitlines() == ["Cannot view a tensor with shape [2, 8, 64]",
                                 '  at File "/venv/transformers/models/gpt2/modeling_gpt2.py", line 225, in forward',
                                 '  at File "/venv/transformers/pytorch_utils.py", line 119, in forward']


@needs_et
def test_executorch_partition_with_a_dependency_cycle_is_lowered_op_by_op():
    """Was (Qwen3 / CodeGen, dynamic mode): 'Invalid partition, found dependency cycles' in ExecuTorch's
    to_edge_transform_and_lower. The retry partitions op by op: a valid program, every linear still int8."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=32)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(input_ids=x, use_cache=False).logits

    wrapped = Logits().eval()
    art = qcompile.compile(wrapped, (ids,), "executorch", mode="dynamic")
    linears = [r for r in art.report.rows if r.op == "linear"]
    assert linears and all(r.status == "int8" for r in linears)
    with torch.no_grad():
        assert sqnr(wrapped(ids), art(ids)) > 25
