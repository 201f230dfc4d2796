"""The HTML report in a real headless Chromium: it renders, logs nothing to the console, and the charts
are drawn (pixels of each chart's colours in the screenshot). With CI set, a missing chromium fails."""
import os
import re
import shutil
import subprocess

import pytest
import torch

import qcompile
from qcompile import report_html as H
import _zoo as zoo
from qcompile.latency import TimingOptions

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--enable-logging=stderr", "--v=0"]
CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\] (.*)")


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("CI"):
        pytest.fail("CI is set but chromium is missing: run .ci/install_chromium.sh")
    pytest.skip("chromium is not installed (apt-get install -y chromium, or .ci/install_chromium.sh)")


def browse(html_path, tmp_path, height=9000, dump_dom=False):
    """(screenshot RGB image or DOM text, console messages) of a page in headless Chromium."""
    exe = _chromium()
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    out = tmp_path / "shot.png"
    mode = ["--dump-dom"] if dump_dom else [f"--window-size=1400,{height}", f"--screenshot={out}"]
    proc = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *mode, f"file://{html_path}"],
                          capture_output=True, text=True, timeout=180)
    console = [m.group(1) for m in map(CONSOLE.search, proc.stderr.splitlines()) if m]
    if dump_dom:
        return proc.stdout, console
    assert out.exists(), proc.stderr[-2000:]
    from PIL import Image
    return Image.open(out).convert("RGB"), console


def pixels(img, hex_colour: str) -> int:
    rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return sum(n for n, c in img.getcolors(img.width * img.height) if c == rgb)


@pytest.fixture(scope="module")
def resnet_page(tmp_path_factory):
    pytest.importorskip("PIL")
    model = zoo.make_resnet18(res=32, num_classes=10)
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(9)]
    art = qcompile.compile(model, (calib[0],), backend="x86", calibration=calib)
    ev = qcompile.evaluate(art, model, [torch.randn(8, 3, 32, 32, generator=g) for _ in range(3)],
                           batch_sizes=(1, 4), timing_options=TimingOptions(1, 4, 6, 0.05))
    path = tmp_path_factory.mktemp("html") / "resnet.html"
    art.report.to_html(str(path), evaluation=ev)
    return path, art, ev


def test_resnet_report_renders_without_console_errors_and_draws_every_chart(resnet_page, tmp_path):
    path, art, ev = resnet_page
    img, console = browse(path, tmp_path)
    assert console == []
    assert pixels(img, H.SQNR_GOOD) + pixels(img, H.SQNR_MID) + pixels(img, H.SQNR_BAD) > 2000  # per-layer SQNR
    assert pixels(img, H.BLUE) > 2000  # activation histograms
    assert pixels(img, H.CANDIDATE) > 40 and pixels(img, H.REFERENCE) > 40  # latency dots of both models
    assert pixels(img, H.GREEN) > 2000  # int8 nodes of the graph (convs)
    assert art.report.layer_sqnr and art.report.activations and ev.latency["candidate"]


def test_page_is_self_contained_and_its_filters_run(resnet_page, tmp_path):
    path, art, _ = resnet_page
    html = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html) and "@import" not in html
    dom, console = browse(path, tmp_path, dump_dom=True)
    n = len(art.report.rows)
    assert f"{n} of {n} shown" in dom and console == []  # the filter script ran on load
    assert "<title>" in dom and "int8" in dom


def test_evaluation_alone_renders(resnet_page, tmp_path):
    _, _, ev = resnet_page
    path = tmp_path / "ev.html"
    ev.to_html(str(path))  # no report: e.g. an .onnx file evaluated from the CLI
    img, console = browse(path, tmp_path, height=1500)
    assert console == [] and pixels(img, H.CANDIDATE) > 40 and pixels(img, H.GREEN) == 0


def test_a_script_error_is_caught(tmp_path):
    """The console check can fail: a page that throws is reported."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>notDefinedAnywhere();</script></body></html>")
    _, console = browse(bad, tmp_path, height=300)
    assert any("notDefinedAnywhere" in c for c in console)


def test_report_without_evaluation_and_predicted_report(tmp_path):
    model = zoo.make_resnet18(res=32, num_classes=10)
    rep = qcompile.explain(model, (torch.randn(1, 3, 32, 32),), backend="x86")
    path = tmp_path / "explain.html"
    rep.to_html(str(path))
    img, console = browse(path, tmp_path, height=3000)
    assert console == [] and pixels(img, H.GREEN) > 2000
    assert "predicted before calibration" in path.read_text()


@pytest.mark.slow
def test_minilm_report_renders_with_every_chart(tmp_path):
    case = zoo.minilm_case(max_length=32)
    enc = case.tokenizer(zoo.SENTENCES, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    samples = [(enc["input_ids"][i:i + 2], enc["attention_mask"][i:i + 2]) for i in range(0, 24, 2)]
    art = qcompile.compile(case.model, case.example_inputs, backend="x86", calibration=samples)
    ev = qcompile.evaluate(art, case.model, samples, task="embedding", batch_sizes=(1, 4),
                           timing_options=TimingOptions(1, 3, 4, 0.05))
    path = tmp_path / "minilm.html"
    art.report.to_html(str(path), evaluation=ev)
    img, console = browse(path, tmp_path, height=12000)
    assert console == []
    assert pixels(img, H.SQNR_GOOD) + pixels(img, H.SQNR_MID) + pixels(img, H.SQNR_BAD) > 2000
    assert pixels(img, H.BLUE) > 2000 and pixels(img, H.CANDIDATE) > 40
    assert pixels(img, H.GREEN) > 1000 and pixels(img, H.RED) > 1000
