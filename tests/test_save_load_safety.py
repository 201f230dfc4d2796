"""Loading never runs code; saving is atomic, honest about formats and readable by others (docs/trust.md).

Crafted files: a pickle whose unpickling creates a marker file is put into every entry of a real .qc of
every backend; files are truncated, bit-flipped, random, of other formats, from a future version. Each
gets an ArtifactFileError naming the file, and the marker never appears.
"""
import errno
import json
import os
import pathlib
import pickle
import random
import re
import struct
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import qcompile
from qcompile import serialize
from qcompile.errors import ArtifactFileError, ConfigError, QCompileError

BACKENDS = ["x86", "onnx", "executorch"]


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class Marker:
    """Unpickling this creates the marker file: the proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _compile(backend):
    try:
        qcompile.backends.get_backend(backend)
    except qcompile.BackendUnavailableError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    data = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    return qcompile.compile(Small().eval(), (data[0],), backend=backend, calibration=data, progress=False,
                            verify=False)


@pytest.fixture(scope="module", params=BACKENDS)
def saved(request, tmp_path_factory):
    """(backend, artifact, path of its .qc, path of its own format or None)."""
    art = _compile(request.param)
    d = tmp_path_factory.mktemp(request.param)
    own = {"onnx": "m.onnx", "executorch": "m.pte"}.get(request.param)
    return request.param, art, art.save(str(d / "m.qc")), art.save(str(d / own)) if own else None


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "CODE_RAN"
    yield path
    assert not path.exists(), "loading the file ran code"


def _refused(path, *patterns):
    with pytest.raises(ArtifactFileError) as e:
        qcompile.load(str(path))
    msg = str(e.value)
    assert str(path) in msg or os.path.basename(str(path)) in msg, msg
    for p in patterns:
        assert re.search(p, msg, re.I), msg
    return msg


def _repack(entries: dict) -> bytes:
    keep = ("kind", "dtype", "shape", "requires_grad")
    return serialize.pack([(n, b, {k: v for k, v in info.items() if k in keep}) for n, (b, info) in entries.items()])


def _entries(path):
    return serialize.unpack(str(path), pathlib.Path(path).read_bytes())


# -- a pickle in every entry ---------------------------------------------------------------------
def test_round_trip_still_works(saved):
    backend, art, path, _ = saved
    art2 = qcompile.load(path)
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(art2.run_reference(x), art.run_reference(x))
    assert art2.backend.name == art.backend.name and len(art2.report.rows) == len(art.report.rows)


def test_a_pickle_in_any_entry_never_runs(saved, tmp_path, marker):
    _, _, path, _ = saved
    entries = _entries(path)
    payloads = {"pickle": pickle.dumps(Marker(str(marker)))}
    buf = tmp_path / "torchsave.pt"
    torch.save({"x": Marker(str(marker))}, buf)
    payloads["torch.save"] = buf.read_bytes()
    assert len(entries) >= 4  # meta, program, weights, example inputs
    for name in entries:
        for kind, payload in payloads.items():
            # as an attacker would: the entry replaced, the checksums left alone ...
            raw = bytearray(pathlib.Path(path).read_bytes())
            blob, info = entries[name]
            start = len(raw) - 32 - sum(len(b) for b, _ in entries.values()) + info["offset"]
            if len(payload) <= len(blob):
                raw[start:start + len(payload)] = payload
                (tmp_path / "a.qc").write_bytes(bytes(raw))
                _refused(tmp_path / "a.qc", "corrupt|checksum")
            # ... and re-packed with valid checksums
            crafted = dict(entries)
            crafted[name] = (payload, info)
            (tmp_path / "b.qc").write_bytes(_repack(crafted))
            _refused(tmp_path / "b.qc", "JSON|bytes|does not match|refusing")
            # a tensor entry that claims to be the pickle's bytes: read as numbers, never unpickled
            if info["kind"] == "tensor":
                crafted[name] = (payload, dict(info, dtype="uint8", shape=[len(payload)]))
                (tmp_path / "c.qc").write_bytes(_repack(crafted))
                _refused(tmp_path / "c.qc", "does not match")


# -- a well-formed container whose graph tries to run code ------------------------------------------
def _with_program(path, tmp_path, edit):
    entries = _entries(path)
    prog = json.loads(entries["program.json"][0])
    edit(prog)
    entries["program.json"] = (json.dumps(prog).encode(), entries["program.json"][1])
    out = tmp_path / "crafted.qc"
    out.write_bytes(_repack(entries))
    return out


def _rename_first_weight(prog, name):
    for spec in prog["graph_module"]["signature"]["input_specs"]:
        for kind, key in (("parameter", "parameter_name"), ("buffer", "buffer_name")):
            if kind in spec:
                spec[kind][key] = name
                return
    raise AssertionError("no weight in the graph")


def _first_node(prog):
    return prog["graph_module"]["graph"]["nodes"][0]


@pytest.mark.parametrize("edit,pattern", [
    (lambda p: _first_node(p).update(target="torch.os.system"), "not a registered torch operator"),
    (lambda p: _first_node(p).update(target="builtins.exec"), "not a registered torch operator"),
    (lambda p: _first_node(p).update(target="torch.ops.aten.__dict__.x"), "not a registered torch operator"),
    (lambda p: p.update(guards_code=["__import__('os').system('touch CODE_RAN')"]), "guard code"),
    (lambda p: _first_node(p).update(name='x"); __import__("os").system("touch CODE_RAN"); ("'), "not a plain name"),
    (lambda p: _rename_first_weight(p, 'w"), open("CODE_RAN", "w"), ("'), "not a plain name"),
])
def test_crafted_graph_is_refused(saved, tmp_path, marker, edit, pattern):
    _refused(_with_program(saved[2], tmp_path, edit), pattern)


def test_crafted_shape_expression_is_refused(saved, tmp_path, marker):
    """torch parses shape expressions with sympy.sympify, an eval: only arithmetic on symbols gets there."""
    evil = f"__import__('pathlib').Path('{marker}').touch()"

    def edit(prog):
        values = prog["graph_module"]["graph"]["tensor_values"]
        for v in values.values():
            v["sizes"][0] = {"as_expr": {"expr_str": evil, "hint": {"as_int": 2}}}
    _refused(_with_program(saved[2], tmp_path, edit), "shape expression")
    for bad in ("open('x', 'w')", "Symbol.__class__", "exec('1')", "[s0]", "lambda: 1", "Symbol('__x')"):
        with pytest.raises(ArtifactFileError):
            from qcompile.safe_program import _check_sym_expr
            _check_sym_expr("f.qc", bad)
    _check_sym_expr("f.qc", "Symbol('s77', positive=True, integer=True)")
    _check_sym_expr("f.qc", "FloorDiv(s0 + 1, 2)*s1 - Max(s0, 3)")


def test_crafted_metadata_is_refused(saved, tmp_path, marker):
    _, _, path, _ = saved
    entries = _entries(path)
    meta = json.loads(entries["meta.json"][0])
    for edit, pattern in [(dict(backend="x86", options={"no_such_option": 1}), "does not take the options"),
                          (dict(options={"x": {"__reduce__": "os.system"}}), "malformed backend options"),
                          (dict(report={"nodes": [{"evil": 1}]}), "malformed report"),
                          (dict(layout={"tensor_names": {"state_dict": ["a\"b"]}}), "malformed state_dict"),
                          (dict(layout=None), "layout")]:
        crafted = dict(entries)
        crafted["meta.json"] = (json.dumps(dict(meta, **edit)).encode(), entries["meta.json"][1])
        (tmp_path / "m.qc").write_bytes(_repack(crafted))
        _refused(tmp_path / "m.qc", pattern)


# -- damaged files -----------------------------------------------------------------------------------
def test_truncated_files(saved, tmp_path):
    data = pathlib.Path(saved[2]).read_bytes()
    hlen = struct.unpack_from("<Q", data, 12)[0]
    for n in sorted({0, 3, 8, 12, 19, 20, 20 + hlen // 2, 20 + hlen, 20 + hlen + 10, len(data) // 2,
                     len(data) - 33, len(data) - 32, len(data) - 1}):
        (tmp_path / "t.qc").write_bytes(data[:n])
        _refused(tmp_path / "t.qc", "truncated|empty")
    (tmp_path / "t.qc").write_bytes(data + b"\0")
    _refused(tmp_path / "t.qc", "trailing")


def test_flipped_bits_and_random_bytes(saved, tmp_path):
    data = pathlib.Path(saved[2]).read_bytes()
    rng = random.Random(0)
    for pos in [25, len(data) // 3, len(data) // 2, len(data) - 40, len(data) - 5] + rng.sample(range(20, len(data)), 5):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        (tmp_path / "f.qc").write_bytes(bytes(flipped))
        _refused(tmp_path / "f.qc", "corrupt|JSON|malformed|truncated|longer")
    for n in (1, 16, 1000, 100_000):
        (tmp_path / "r.qc").write_bytes(bytes(rng.getrandbits(8) for _ in range(n)))
        _refused(tmp_path / "r.qc", "not a qcompile artifact|pickle|ONNX|ExecuTorch|truncated|zip")
    (tmp_path / "r.qc").write_bytes(b"QCOMPILE" + bytes(rng.getrandbits(8) for _ in range(200)))
    _refused(tmp_path / "r.qc", "newer|unknown|truncated|format")


def test_future_and_unknown_versions(saved, tmp_path):
    data = bytearray(pathlib.Path(saved[2]).read_bytes())
    for version, pattern in [(serialize.FORMAT_VERSION + 1, "newer qcompile.*upgrade"), (99, "newer"),
                             (1, "unknown .qc file format 1")]:
        struct.pack_into("<I", data, 8, version)
        (tmp_path / "v.qc").write_bytes(bytes(data))
        _refused(tmp_path / "v.qc", pattern)


# -- files of other formats --------------------------------------------------------------------------
def test_own_format_files_are_named(saved, tmp_path):
    backend, _, _, own = saved
    if own is None:
        pytest.skip("x86 writes .qc only")
    _refused(own, {"onnx": "ONNX model.*onnxruntime", "executorch": "ExecuTorch program.*Runtime"}[backend],
             r"\.qc")
    renamed = tmp_path / "model.qc"  # the content decides, not the name
    renamed.write_bytes(pathlib.Path(own).read_bytes())
    _refused(renamed, "ONNX|ExecuTorch")


def test_torch_files_are_never_unpickled(tmp_path, marker):
    torch.save({"w": torch.ones(2), "evil": Marker(str(marker))}, tmp_path / "m.qc")
    _refused(tmp_path / "m.qc", "torch.save.*pickle")
    (tmp_path / "p.qc").write_bytes(pickle.dumps(Marker(str(marker))))
    _refused(tmp_path / "p.qc", "pickle")
    ep = torch.export.export(Small().eval(), (torch.randn(1, 3, 6, 6),))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    _refused(tmp_path / "m.pt2", "torch.export archive")
    # qcompile's format 1 (a torch.export archive with a qcompile.json), with a pickled example input
    with zipfile.ZipFile(tmp_path / "m.pt2") as z, zipfile.ZipFile(tmp_path / "v1.qc", "w") as out:
        for n in z.namelist():
            data = z.read(n)
            if n.endswith("sample_inputs/model.pt"):
                data = pickle.dumps(Marker(str(marker)))
            out.writestr(n, data)
        out.writestr("m/extra/qcompile.json", json.dumps({"version": 1}))
    _refused(tmp_path / "v1.qc", "older qcompile.*re-create")


def test_missing_file_and_directory(tmp_path):
    _refused(tmp_path / "nope.qc", "no such file")
    _refused(tmp_path, "directory")


def test_package_source_never_unpickles():
    """The installed package (wheel or editable) has no path that can unpickle a file: no pickle, no eval, and
    ``torch.load`` only with ``weights_only=True`` spelled in the same call (the CLI's ``.pt`` data files)."""
    roots = {os.path.dirname(qcompile.__file__)} | set(qcompile.passes.__path__) | set(qcompile.backends.__path__)
    bad = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|torch\.load\((?!.*weights_only=True)|torch\.export\.load\(|"
                     r"import pickle|from pickle|\bdill\b|cloudpickle|(?<![.\w`])eval\(|(?<![.\w`])exec\(")
    hits, n = [], 0
    for root in roots:
        for f in pathlib.Path(root).rglob("*.py"):
            n += 1
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if bad.search(line.split("#")[0]):
                    hits.append(f"{f}:{i}: {line.strip()}")
    assert n > 40 and not hits, hits


# -- saving ----------------------------------------------------------------------------------------
def test_extension_decides_the_format(saved, tmp_path):
    backend, art, _, _ = saved
    writes = {"x86": [".qc"], "onnx": [".qc", ".onnx"], "executorch": [".qc", ".pte"]}[backend]
    for ext in (".onnx", ".pte", ".pt2", ".bin", ""):
        if ext in writes:
            continue
        with pytest.raises(ConfigError, match=re.escape(", ".join(writes))):
            art.save(str(tmp_path / f"m{ext}"))
        assert not os.listdir(tmp_path)
    for ext in writes:
        art.save(str(tmp_path / f"m{ext.upper()}"))  # case-insensitive
    if backend == "onnx":
        import onnx
        onnx.checker.check_model(onnx.load(str(tmp_path / "m.ONNX")))
    if backend == "executorch":
        assert (tmp_path / "m.PTE").read_bytes()[4:6] == b"ET"
    assert (tmp_path / "m.QC").read_bytes()[:8] == b"QCOMPILE"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_saved_files_get_the_umask_permissions(saved, tmp_path, umask):
    _, art, _, own = saved
    old = os.umask(umask)
    try:
        paths = [art.save(str(tmp_path / "m.qc"))]
        if own:
            paths.append(art.save(str(tmp_path / ("m" + os.path.splitext(own)[1]))))
    finally:
        os.umask(old)
    for p in paths:
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask, p


def test_full_disk_leaves_the_old_file_and_no_temporary(saved, tmp_path, monkeypatch):
    _, art, _, _ = saved
    path = tmp_path / "m.qc"
    path.write_bytes(b"the old file")
    real = os.write

    def full_disk(fd, data):
        real(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        art.save(str(path))
    monkeypatch.undo()
    assert path.read_bytes() == b"the old file" and os.listdir(tmp_path) == ["m.qc"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_mid_write_leaves_the_old_file(saved, tmp_path, monkeypatch, exc):
    backend, art, _, _ = saved
    import onnx
    targets = [("m.qc", serialize, "pack")] + ([("m.onnx", onnx, "save_model")] if backend == "onnx" else [])

    def partial_then_raise(*args, **kwargs):
        for a in args:  # write part of the temporary file the writer was given, then fail
            if isinstance(a, str) and os.path.basename(a).startswith(".qcompile-"):
                pathlib.Path(a).write_bytes(b"partial")
        raise exc
    for name, owner, attr in targets:
        (tmp_path / name).write_bytes(b"old")
        monkeypatch.setattr(owner, attr, partial_then_raise)
        with pytest.raises(type(exc)):
            art.save(str(tmp_path / name))
        monkeypatch.undo()
        assert (tmp_path / name).read_bytes() == b"old"
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".qcompile-")]


def test_qcompile_errors_are_one_family():
    assert issubclass(ArtifactFileError, QCompileError)


# -- random mutations of the JSON entries, re-packed with valid checksums ------------------------------
def _paths(x, prefix=()):
    yield prefix
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _set(x, path, value):
    for k in path[:-1]:
        x = x[k]
    x[path[-1]] = value


@pytest.fixture(scope="module")
def x86_qc(tmp_path_factory):
    art = _compile("x86")
    return art.save(str(tmp_path_factory.mktemp("fuzz") / "m.qc"))


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats(allow_nan=False)
                           | st.text(max_size=12), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(entry=st.sampled_from(["program.json", "meta.json"]), where=st.integers(0, 10**6), value=JSON_VALUES)
def test_random_json_mutations_end_in_a_qcompile_error_or_an_artifact(x86_qc, tmp_path, entry, where, value):
    entries = _entries(x86_qc)
    doc = json.loads(entries[entry][0])
    paths = [p for p in _paths(doc) if p]
    _set(doc, paths[where % len(paths)], value)
    entries[entry] = (json.dumps(doc).encode(), entries[entry][1])
    path = tmp_path / "mutated.qc"
    path.write_bytes(_repack(entries))
    try:
        art = qcompile.load(str(path))
    except QCompileError as e:
        assert str(path) in str(e) or isinstance(e, (ConfigError, qcompile.BackendUnavailableError)), e
    else:
        assert isinstance(art, qcompile.Artifact)


def test_a_program_with_infinite_constants_saves_and_loads(tmp_path):
    """An attention mask's -inf is a float literal torch serializes as "-Infinity": not a name to refuse."""
    import torch
    from torch import nn
    import qcompile

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            s = self.fc(x)
            return torch.softmax(s.masked_fill(s < 0, float("-inf")).clamp(max=float("inf")), -1)

    torch.manual_seed(0)
    model = Masked().eval()
    cal = [torch.randn(2, 8) for _ in range(3)]
    art = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal)
    back = qcompile.load(art.save(str(tmp_path / "m.qc")))
    torch.testing.assert_close(back(cal[1]), art(cal[1]))


def test_a_frozen_parameter_saves_and_loads(tmp_path):
    """A parameter with requires_grad=False (Whisper's sinusoidal positions) is still a parameter of the
    program: it used to load back as a plain tensor, which torch.export's verifier refuses."""
    import torch
    from torch import nn
    import qcompile

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(4, 8)
            self.pos.requires_grad_(False)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x + self.pos.weight)

    torch.manual_seed(0)
    model = Positions().eval()
    cal = [torch.randn(2, 4, 8) for _ in range(3)]
    art = qcompile.compile(model, (cal[0],), backend="x86", calibration=cal)
    back = qcompile.load(art.save(str(tmp_path / "m.qc")))
    torch.testing.assert_close(back(cal[1]), art(cal[1]))
