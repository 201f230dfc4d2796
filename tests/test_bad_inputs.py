"""Every bad input ends in a qcompile error that names the input and what to do -- never a raw torch error.

Property-based (hypothesis, derandomized): random shapes, dtypes, NaN/Inf patterns, sample kinds and option
values. Each case ends in a QCompileError subclass or a correct result, and the tests say which one.
"""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import qcompile
from qcompile.errors import (CalibrationError, CaptureError, ConfigError, InputError, QCompileError,
                             QCompileWarning)
from qcompile.qparams import sqnr

FAST = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
          torch.bool]


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.drop = nn.Linear(8, 4), nn.Dropout(0.5)

    def forward(self, x):
        return torch.relu(self.fc(self.drop(x)))


class DictModel(nn.Module):
    """forward(self, batch: dict): the shape of many data pipelines' samples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, batch: dict):
        return self.fc(batch["x"]) * batch["mask"]


class ReturnsNothing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        self.fc(x)


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)


def _x(n=4, seed=0):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def prepared():
    torch.manual_seed(0)
    return qcompile.prepare(Lin().eval(), (_x(),))


@st.composite
def tensors(draw):
    """Random rank / dims / dtype and NaN / +Inf / -Inf at random places."""
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=4)))
    dtype = draw(st.sampled_from(DTYPES))
    t = (torch.randn(shape) * 3).to(dtype) if dtype.is_floating_point else torch.randint(0, 3, shape).to(dtype)
    if dtype.is_floating_point and t.numel():
        for special in draw(st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf")]), max_size=2)):
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = special
    return t


def _valid(t) -> bool:
    return (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 2 and t.shape[1] == 8
            and t.shape[0] > 0 and bool(torch.isfinite(t).all()))


# -- calibration samples ------------------------------------------------------------------------------
@FAST
@given(t=tensors())
def test_random_calibration_tensors(prepared, t):
    """Exactly the samples shaped like the example input (any batch size, float32, finite) calibrate."""
    p = copy.deepcopy(prepared)
    if _valid(t):
        p.calibrate([t], progress=False)
        assert p.num_calibration_samples == 1
    else:
        with pytest.raises(CalibrationError, match=r"calibration sample 0.*(shape|dtype|empty|NaN/Inf|elements)"):
            p.calibrate([t], progress=False)


@FAST
@given(i=st.integers(0, 3), t=tensors())
def test_one_bad_sample_among_good_ones_is_named(prepared, i, t):
    samples = [_x(2, s) for s in range(4)]
    samples[i] = t
    p = copy.deepcopy(prepared)
    if _valid(t):
        p.calibrate(samples, progress=False)
    else:
        with pytest.raises(CalibrationError, match=f"calibration sample {i}"):
            p.calibrate(samples, progress=False)


SAMPLE_KINDS = st.sampled_from([
    ("tensor", lambda: _x(), True), ("tuple", lambda: (_x(),), True), ("list", lambda: [_x()], True),
    ("dict by name", lambda: {"x": _x()}, True), ("dict wrong name", lambda: {"y": _x()}, False),
    ("pair", lambda: (_x(), 0), False), ("nested", lambda: ((_x(),),), False), ("none", lambda: None, False),
    ("string", lambda: "x", False), ("number", lambda: 3.0, False), ("numpy", lambda: _x().numpy(), False),
    ("empty tuple", lambda: (), False)])


@FAST
@given(kinds=st.lists(SAMPLE_KINDS, min_size=1, max_size=4))
def test_mixed_sample_kinds(prepared, kinds):
    """Tensors, tuples, lists and dicts by parameter name mix freely; anything else is a CalibrationError."""
    p = copy.deepcopy(prepared)
    samples = [make() for _, make, _ in kinds]
    if all(ok for _, _, ok in kinds):
        p.calibrate(samples, progress=False)
        assert p.num_calibration_samples == len(samples)
    else:
        with pytest.raises(CalibrationError):
            p.calibrate(samples, progress=False)


@pytest.mark.parametrize("calibration,pattern", [
    (5, "iterable of samples"), ("abc", "iterable"), (_x(), "single tensor"), ({"x": _x()}, "iterable"),
    ([], "empty")])
def test_calibration_argument_itself(calibration, pattern):
    with pytest.raises(CalibrationError, match=pattern):
        qcompile.compile(Lin().eval(), (_x(),), calibration=calibration, progress=False)


def test_direct_calls_of_the_prepared_model_are_checked(prepared):
    p = copy.deepcopy(prepared)
    with pytest.raises(CalibrationError, match=r"dtype torch.float64.*\.to\(torch.float32\)"):
        p(_x().double())
    with pytest.raises(CalibrationError, match=r"shape \(4, 16\).*\(4, 8\).*dimension 0"):
        p(torch.randn(4, 16))
    assert p.num_calibration_samples == 0
    p(_x())
    assert p.num_calibration_samples == 1


def test_gptq_samples_are_checked():
    art = qcompile.compile(Lin().eval(), (_x(),), calibration=[{"x": _x(4, 1)}, (_x(4, 2),), _x(4, 3)],
                           algorithm="gptq", mode="weight_only", progress=False)  # every sample kind
    assert sqnr(art.run_reference(_x()), art(_x())) > 30
    with pytest.raises(CalibrationError, match="calibration sample 1.*NaN"):
        qcompile.compile(Lin().eval(), (_x(),), calibration=[_x(), _x() * float("nan")], algorithm="gptq",
                         mode="weight_only", progress=False)


# -- dict inputs ------------------------------------------------------------------------------------
def _dict_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(4, 8, generator=g), "mask": (torch.rand(4, 4, generator=g) > 0.2).float()}


@pytest.mark.parametrize("as_tuple", [True, False])
def test_dict_taking_model_calibrates_on_dict_samples(as_tuple):
    torch.manual_seed(0)
    model = DictModel().eval()
    example = (_dict_batch(0),) if as_tuple else _dict_batch(0)  # a bare dict is the one positional input
    art = qcompile.compile(model, example, calibration=[_dict_batch(s) for s in range(1, 6)], progress=False)
    b = _dict_batch(9)
    with torch.no_grad():
        assert sqnr(model(b), art(b)) > 15 and sqnr(art.run_reference(b), art(b)) > 30
    with pytest.raises(InputError, match=r"'x'.*dtype torch.float64"):
        art({"x": b["x"].double(), "mask": b["mask"]})
    with pytest.raises(CalibrationError, match=r"\['mask'\].*shape"):
        qcompile.compile(model, example, calibration=[{"x": b["x"], "mask": torch.ones(4, 5)}], progress=False)
    with pytest.raises(CalibrationError, match="structure of the example inputs"):
        qcompile.compile(model, example, calibration=[{"x": b["x"]}], progress=False)


# -- models and example inputs --------------------------------------------------------------------------
@FAST
@given(t=tensors())
def test_random_example_inputs(t):
    """explain() on random example inputs: a report, or an InputError naming the example input."""
    if _valid(t) or (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() >= 1 and t.shape[-1] == 8
                     and t.numel() and bool(torch.isfinite(t).all())):
        assert qcompile.explain(Lin().eval(), (t,)).rows
    else:
        with pytest.raises(InputError, match="example input|failed to run on the example inputs"):
            qcompile.explain(Lin().eval(), (t,))


def test_model_that_returns_nothing():
    with pytest.raises(CaptureError, match="returned None.*return the output"):
        qcompile.compile(ReturnsNothing().eval(), (_x(),), calibration=[_x()], progress=False)


def test_training_mode_warns_and_captures_eval_mode():
    torch.manual_seed(0)
    model = Lin().train()
    with pytest.warns(QCompileWarning, match="training mode.*eval mode.*model.eval"):
        art = qcompile.compile(model, (_x(),), calibration=[_x(4, s) for s in range(3)], progress=False)
    assert model.training  # the user's model is untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error", QCompileWarning)  # eval mode: no warning
        ref = qcompile.compile(copy.deepcopy(model).eval(), (_x(),), calibration=[_x(4, s) for s in range(3)],
                               progress=False)
    x = _x(6, 7)
    assert torch.equal(art(x), ref(x)) and torch.equal(art(x), art(x))  # dropout off: deterministic


@pytest.mark.parametrize("where", ["parameter", "buffer"])
def test_weights_not_on_the_cpu(where):
    """The meta device stands in for CUDA / MPS: no values and not the CPU."""
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4)).eval()
    if where == "parameter":
        model[0].to("meta")
        pattern = "parameter '0.weight' is on the meta device"
    else:
        model[1].running_mean = model[1].running_mean.to("meta")
        pattern = "buffer '1.running_mean' is on the meta device"
    with pytest.raises(InputError, match=pattern):
        qcompile.compile(model, (_x(),), calibration=[_x()], progress=False)


def test_zero_size_example_and_nan_example():
    with pytest.raises(InputError, match=r"example input args\[0\] is empty"):
        qcompile.compile(Lin().eval(), (torch.randn(0, 8),), calibration=[_x()], progress=False)
    with pytest.raises(InputError, match=r"example input args\[0\] holds 1 NaN/Inf"):
        qcompile.explain(Lin().eval(), (torch.cat([_x(), torch.tensor([[float("inf")] + [0.0] * 7])]),))


# -- capture failures: qcompile's message, not torch's dumps ---------------------------------------------
_CAPTURE_FAILURE = """
import qcompile, torch, sys
sys.path.insert(0, {tests!r})
from test_bad_inputs import ValueBranch
try:
    qcompile.explain(ValueBranch().eval(), (torch.randn(4, 8),))
except qcompile.CaptureError as e:
    print("CAPTURE ERROR:", str(e).splitlines()[0])
"""


@pytest.mark.parametrize("debug", [False, True])
def test_capture_failure_shows_no_torch_graph_dump_unless_debug(debug):
    env = dict(os.environ, QCOMPILE_DEBUG="1" if debug else "0")
    out = subprocess.run([sys.executable, "-c", _CAPTURE_FAILURE.format(tests=os.path.dirname(__file__))],
                         capture_output=True, text=True, env=env, timeout=300)
    assert "CAPTURE ERROR: torch.export could not capture ValueBranch" in out.stdout, out.stderr[-2000:]
    dumps = out.stderr.count("def forward(")
    if debug:
        assert dumps >= 1  # torch's partial graph, behind the flag
    else:
        assert dumps == 0 and "torch.ops.aten" not in out.stderr, out.stderr[-2000:]


# -- option values ------------------------------------------------------------------------------------
OPTION_VALUES = {
    "mode": ["static", "dynamic", "weight_only", "qat", "int8", None, 3],
    "strict": [True, False, "no", 1, None],
    "quantize_outputs": [None, True, False, "yes", 0],
    "exclude": [None, [], ["fc"], "fc", nn.Linear, 5, [3.5]],
    "allow_float": [None, ["fc"], "fc", 5],
    "example_kwargs": [None, {}, 5, "x", {"y": 1}],
    "backend_options": [None, {}, 5, {"no_such_option": 1}, {"engine": "fbgemm"}, {"engine": "nope"}],
    "weights": [None, qcompile.WeightSpec(bits=8), qcompile.WeightSpec(bits=4), 8, "int8"],
    "activations": [None, qcompile.ActivationSpec(), "int3", 1.5],
    "algorithm": [None, "rtn", "gptq", "adaround", 3],
    "config": [None, qcompile.QConfig(), 5],
    "backend": ["x86", "cpu", "onnx", "foo", 5, None],
    "no_such_option": [1],
}


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(choice=st.dictionaries(st.sampled_from(sorted(OPTION_VALUES)), st.integers(0, 6), max_size=3))
def test_random_option_values(choice):
    """explain() with random option values: a report or a QCompileError, never another exception."""
    opts = {k: OPTION_VALUES[k][i % len(OPTION_VALUES[k])] for k, i in choice.items()}
    backend = opts.pop("backend", "x86")
    try:
        report = qcompile.explain(Lin().eval(), (_x(),), backend=backend, **opts)
    except QCompileError as e:
        assert str(e)
    else:
        assert report.rows


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(strict="no"), "strict must be True or False"), (dict(exclude=5), "exclude must be a list"),
    (dict(backend=5), "backend must be a backend name"), (dict(verify="x"), "verify must be True or False"),
    (dict(backend_options=5), "backend_options must be a dict"), (dict(progress="x"), "progress must be"),
    (dict(backend="foo"), "unknown backend 'foo'"), (dict(quantize_outputs="yes"), "quantize_outputs must be")])
def test_option_values_are_named(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        qcompile.compile(Lin().eval(), (_x(),), calibration=[_x()], **{"progress": False, **kwargs})


def test_exclude_as_one_string_is_one_name():
    from collections import OrderedDict
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(8, 8), act=nn.ReLU(), fc2=nn.Linear(8, 4))).eval()
    status = {r.module: r.status for r in qcompile.explain(model, (_x(),), exclude="fc1").rows if r.op == "linear"}
    assert status["fc1"] == "float: excluded by user" and not status["fc2"].endswith("excluded by user"), status


# -- the compiled artifact ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(prepared):
    p = copy.deepcopy(prepared)
    p.calibrate([_x(4, s) for s in range(4)], progress=False)
    return qcompile.convert(p)


@FAST
@given(t=tensors())
def test_random_artifact_inputs(artifact, t):
    """A compiled artifact runs inputs shaped like the example (any batch) and names anything else."""
    ok = isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 2 and t.shape[1] == 8
    if ok and t.shape[0] > 0 and bool(torch.isfinite(t).all()):
        y, ref = artifact(t), artifact.run_reference(t)
        assert y.shape == ref.shape == (t.shape[0], 4)
        assert (y - ref).abs().max() <= 0.05 * (ref.abs().max() + 1)
    elif not ok:
        with pytest.raises(InputError, match="compiled for|dtype|shape"):
            artifact(t)
    else:  # an empty batch or non-finite values: a result or a qcompile error, nothing else
        try:
            artifact(t)
        except QCompileError:
            pass
    with pytest.raises(InputError):
        artifact(t, t)


# -- the artifact's fast input check agrees with the general one --------------------------------------
@pytest.fixture(scope="module")
def lin_artifact():
    torch.manual_seed(0)
    return qcompile.compile(Lin().eval(), (_x(),), "x86", calibration=[_x(seed=s) for s in range(2)],
                            progress=False, verify=False)


@FAST
@given(args=st.lists(st.one_of(tensors(), st.integers(1, 6).map(_x), st.integers(1, 6).map(lambda n: _x(n).double()),
                                st.just(3.0), st.none()), min_size=0, max_size=3))
def test_fast_input_check_accepts_only_what_the_general_check_accepts(lin_artifact, args):
    """``Artifact._like_example`` (the common call's check in a few operations) restates part of
    ``_check_inputs``: whatever it accepts, the general check accepts too, and a call raises InputError exactly
    when the general check does."""
    art, args = lin_artifact, tuple(args)
    try:
        art._check_inputs(args, {})
        general_ok = True
    except InputError:
        general_ok = False
    if art._like_example(args):
        assert general_ok
    elif len(args) == 1 and _valid(args[0]):
        pytest.fail("the fast check refused a plain valid input")
    if not general_ok:
        with pytest.raises(InputError):
            art(*args)
