"""engine="auto" on x86: each conv / linear runs on the kernel family measured fastest on this CPU,
the choice is cached per CPU (JSON only), and the numbers stay within one step of the reference graph."""
import json
import re

import pytest
import torch
from torch import nn

import qcompile
from qcompile.backends.x86 import kernel_choice

FAMILIES = kernel_choice.available_families()
pytestmark = pytest.mark.skipif(len(FAMILIES) < 2, reason="this torch build has a single int8 kernel family")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2), nn.Flatten(),
                         nn.Linear(16 * 7 * 7, 10)).eval()


def _compile(model):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cal = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return qcompile.compile(model, (x,), backend="x86", calibration=cal, backend_options={"engine": "auto"}), x


def _families(art):
    out = {}
    for r in art.report.rows:
        m = re.search(r"quantized::\w+ \((\w+), measured ([^)]*)", r.kernel)
        if m and r.op in ("conv2d", "linear"):
            out[r.name] = m.group(1), m.group(2)
    return out


def test_each_layer_runs_on_the_family_measured_fastest_and_the_choice_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    art, x = _compile(_model())
    fams = _families(art)
    assert len(fams) == 2  # the two convs (the last linear feeds the float output: float compute)
    assert all(family in FAMILIES for family, _ in fams.values())
    cache = json.load(open(tmp_path / "x86_kernel_choice.json"))
    assert cache["version"] == 1 and len(cache["choices"]) == 2
    for entry in cache["choices"].values():
        assert entry["family"] == min(entry["ms"], key=entry["ms"].get)  # the faster one was kept
    assert sorted(f for f, _ in fams.values()) == sorted(e["family"] for e in cache["choices"].values())
    again, _ = _compile(_model())  # same machine: read from the cache, nothing re-measured
    assert {k: v[0] for k, v in _families(again).items()} == {k: v[0] for k, v in fams.items()}
    assert _families(again) == fams  # the very timings of the first compile: read back, not re-measured
    assert art.report.verify["within_one_step"] >= 0.99, art.report.verify  # both families: the same int8 math


def test_a_bad_cache_file_is_ignored_never_executed(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    (tmp_path / "x86_kernel_choice.json").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle, not JSON
    art, _ = _compile(_model())
    assert len(_families(art)) == 2
    assert json.load(open(tmp_path / "x86_kernel_choice.json"))["version"] == 1  # rewritten as JSON


def test_engine_x86_packs_for_torchs_rule_without_measuring(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    x = torch.randn(2, 3, 16, 16)
    art = qcompile.compile(_model(), (x,), backend="x86", calibration=[x], backend_options={"engine": "x86"})
    assert not _families(art) and not (tmp_path / "x86_kernel_choice.json").exists()


def test_the_default_engine_measures(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    x = torch.randn(2, 3, 16, 16)
    art = qcompile.compile(_model(), (x,), backend="x86", calibration=[x])
    assert len(_families(art)) == 2 and (tmp_path / "x86_kernel_choice.json").exists()
