"""The qcompile CLI end to end on a module:factory model: compile (x86 .qc, ONNX, ExecuTorch), explain,
evaluate, inspect, report, demo; data from .npy / .pt / image folders / module:callable; one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from qcompile import cli, demo_model
from qcompile.cli_io import load_data, load_model
from qcompile.errors import InputError

MODEL = "qcompile.demo_model:tiny_cnn"
CALIB = "qcompile.demo_model:calibration"
EVAL = "qcompile.demo_model:evaluation"


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err):
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    out = {}
    backends = [("x86", "tiny.qc"), ("onnx", "tiny.onnx")]
    try:
        import executorch  # noqa: F401
        backends.append(("executorch", "tiny.pte"))
    except ImportError:
        pass
    for backend, name in backends:
        path = str(d / name)
        extra = ["--html", str(d / "compile.html")] if backend == "x86" else []
        assert cli.main(["compile", MODEL, "--backend", backend, "--calibration", CALIB, "-o", path, *extra]) == 0
        out[os.path.splitext(name)[1]] = path
    out["dir"] = d
    return out


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "qcompile 0.1.0"
    for cmd in ("compile", "explain", "evaluate", "inspect", "report", "demo"):
        with pytest.raises(SystemExit) as e:
            cli.main([cmd, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and f"usage: qcompile {cmd}" in out and len(out.splitlines()) > 3


def test_unknown_backend_is_one_line_and_exit_code_2_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "qcompile.cli", "demo", "--backend", "foo"], capture_output=True,
                          text=True, timeout=300)
    line = _one_line_error(proc.returncode, proc.stderr)
    from qcompile.backends import available_backends  # plus any installed through the entry point (CI: toy)
    assert line == f"qcompile demo: error: unknown backend 'foo'; available: {', '.join(available_backends())}"
    proc = subprocess.run([sys.executable, "-m", "qcompile.cli", "frobnicate"], capture_output=True, text=True,
                          timeout=300)
    assert "invalid choice: 'frobnicate'" in _one_line_error(proc.returncode, proc.stderr)


def test_compile_writes_each_backend_and_the_html(files):
    for ext in (".qc", ".onnx"):
        assert os.path.getsize(files[ext]) > 1000
    assert "<svg" in (files["dir"] / "compile.html").read_text()


def test_inspect_each_saved_backend(files, capsys):
    code, out, _ = run(capsys, "inspect", files[".qc"])
    assert code == 0 and "qcompile artifact" in out and "int8 share: parameters" in out and "conv" in out
    code, out, _ = run(capsys, "inspect", files[".onnx"])
    assert code == 0 and "ONNX Runtime" in out and "QLinearConv x2" in out and "qcompile report: backend=onnx" in out
    if ".pte" not in files:
        pytest.skip("executorch is not installed")
    code, out, _ = run(capsys, "inspect", files[".pte"])
    assert code == 0 and "XnnpackBackend" in out and "inputs:  [4, 3, 16, 16] float32" in out


def test_explain_a_module_factory_from_the_current_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models_for_cli.py").write_text(
        "import torch\n"
        "def make():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))\n"
        "    return m.eval(), (torch.randn(2, 8),)\n")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "explain", "my_models_for_cli:make", "--backend", "onnx")
    assert code == 0 and "predicted, before calibration" in out and "backend onnx" in out


def test_evaluate_saved_artifacts_against_the_float_model(files, capsys):
    js = str(files["dir"] / "ev.json")
    code, out, _ = run(capsys, "evaluate", files[".onnx"], "--model", MODEL, "--data", EVAL, "--slices", "brightness",
                       "--batch-sizes", "1,4", "--json", js)
    assert code == 0 and "candidate: onnxruntime" in out and "slices (worst first)" in out
    ev = json.loads(open(js).read())
    assert ev["n_samples"] == 64 and {s["slice"] for s in ev["slices"]} == {"bright", "dim"}
    assert set(ev["latency"]["candidate"]) == {"1", "4"}
    html = str(files["dir"] / "ev.html")
    code, out, _ = run(capsys, "evaluate", files[".qc"], "--model", MODEL, "--data", EVAL, "--batch-sizes", "",
                       "--html", html)
    assert code == 0 and "PyTorch quantized CPU kernels" in out and os.path.exists(html)
    code, _, err = run(capsys, "evaluate", files[".onnx"], "--data", EVAL)
    assert "needs --model MODEL" in _one_line_error(code, err)


def test_report_of_a_qc_file(files, capsys):
    html = str(files["dir"] / "report.html")
    code, out, _ = run(capsys, "report", files[".qc"], "--html", html)
    assert code == 0 and "<svg" in open(html).read()
    code, _, err = run(capsys, "report", files[".onnx"], "--html", html)
    assert "use qcompile inspect" in _one_line_error(code, err)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    code, _, err = run(capsys, "explain", "no_such_module_xyz:make")
    assert "cannot import 'no_such_module_xyz'" in _one_line_error(code, err)
    pt2 = tmp_path / "model.pt2"
    pt2.write_bytes(b"PK\x03\x04")
    code, _, err = run(capsys, "explain", str(pt2))
    assert "can unpickle" in _one_line_error(code, err)
    code, _, err = run(capsys, "inspect", str(tmp_path / "missing.qc"))
    assert "no such file" in _one_line_error(code, err)


def test_data_forms(tmp_path):
    _, example = demo_model.tiny_cnn()
    x = torch.rand(10, 3, 16, 16)
    np.save(tmp_path / "x.npy", x.numpy())
    assert torch.equal(load_data(str(tmp_path / "x.npy"), example), x)
    torch.save({"inputs": x, "targets": torch.arange(10)}, tmp_path / "d.pt")
    d = load_data(str(tmp_path / "d.pt"), example)
    assert torch.equal(d["inputs"], x) and d["targets"].tolist() == list(range(10))
    torch.save({"inputs": x, "evil": InputError("x")}, tmp_path / "evil.pt")  # needs unpickling: refused
    with pytest.raises(InputError, match="weights_only"):
        load_data(str(tmp_path / "evil.pt"), example)
    from PIL import Image
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (255, 0, 10 * i)).save(img_dir / f"{i}.png")
    imgs = load_data(str(img_dir), example)
    assert imgs.shape == (3, 3, 16, 16) and imgs[:, 0].min() == 1.0 and imgs[:, 1].max() == 0.0
    assert len(load_data(CALIB, example)) == 16
    model, args, kwargs = load_model(MODEL)
    assert isinstance(model, torch.nn.Module) and args[0].shape == (4, 3, 16, 16) and kwargs == {}


def test_compile_from_an_npy_file_and_demo(tmp_path, capsys):
    np.save(tmp_path / "calib.npy", torch.cat(demo_model.calibration()).numpy())
    out_path = str(tmp_path / "npy.qc")
    code, out, _ = run(capsys, "compile", MODEL, "--calibration", str(tmp_path / "calib.npy"), "-o", out_path)
    assert code == 0 and "held-out SQNR vs float" in out and os.path.exists(out_path)
    code, out, _ = run(capsys, "demo", "--html", str(tmp_path / "demo.html"))
    assert code == 0 and "qcompile evaluation" in out and "slices (worst first)" in out
    assert (tmp_path / "demo.html").exists()


@pytest.mark.slow
def test_hugging_face_folder_model(capsys):
    from _zoo import minilm_path
    code, out, _ = run(capsys, "explain", str(minilm_path()), "--seq-len", "16")
    assert code == 0 and "linear" in out and "predicted" in out
