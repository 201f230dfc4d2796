"""The ``.qc`` container: a file qcompile reads itself, with nothing that can run code.

Layout (all integers little-endian)::

    b"QCOMPILE" | u32 format version | u64 header length | header (JSON, UTF-8) | payload | SHA-256 (32 bytes)

The header lists every entry of the payload: name, kind ("json" or "tensor"), offset, size and SHA-256;
a tensor entry also has its dtype and shape and holds the raw little-endian element bytes. The trailer is
the SHA-256 of everything before it. Reading uses ``json`` and ``torch.frombuffer`` only: no pickle, no
``torch.load``. Any mismatch is refused with an :class:`~qcompile.errors.ArtifactFileError` that names the
file and what is wrong. See ``docs/trust.md``.
"""
from __future__ import annotations

import hashlib
import json
import struct
import sys

import torch

from .errors import ArtifactFileError

MAGIC = b"QCOMPILE"
FORMAT_VERSION = 2  # 1 was a torch.export archive (it could unpickle): refused, see _sniff
_PREFIX = struct.Struct("<8sIQ")
_TRAILER = 32
_MAX_HEADER = 64 << 20
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool)}


# -- writing ------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> tuple[bytes, dict]:
    """Raw little-endian element bytes of ``t`` and its dtype / shape."""
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ArtifactFileError(f"cannot store a {t.dtype} tensor in a .qc file (stored dtypes: {sorted(DTYPES)})")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    if sys.byteorder != "little" and flat.element_size() > 1:  # pragma: no cover - big-endian hosts
        raise ArtifactFileError("writing .qc files is only supported on little-endian machines")
    return data, {"dtype": name, "shape": list(t.shape)}


def pack(entries: list[tuple[str, bytes, dict]]) -> bytes:
    """entries: (name, data, info) with info {"kind": "json"} or {"kind": "tensor", "dtype", "shape"}."""
    table, offset = [], 0
    for name, data, info in entries:
        table.append(dict(info, name=name, offset=offset, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
        offset += len(data)
    header = json.dumps({"format": "qcompile", "payload_size": offset, "entries": table},
                        allow_nan=False).encode()
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + b"".join(d for _, d, _ in entries)
    return body + hashlib.sha256(body).digest()


# -- reading ------------------------------------------------------------------------------------
def unpack(path: str, data: bytes) -> dict[str, tuple[bytes, dict]]:
    """Check a whole .qc file and return {entry name: (bytes, info)}; raise ArtifactFileError otherwise."""
    if len(data) < _PREFIX.size or data[:8] != MAGIC:
        raise ArtifactFileError(f"{path}: {_sniff(path, data)}")
    _, version, hlen = _PREFIX.unpack_from(data)
    if version > FORMAT_VERSION:
        raise ArtifactFileError(f"{path}: written by a newer qcompile (file format {version}; this qcompile reads "
                                f"format {FORMAT_VERSION}): upgrade qcompile (pip install -U qcompile) to load it")
    if version != FORMAT_VERSION:
        raise ArtifactFileError(f"{path}: unknown .qc file format {version} (this qcompile reads format "
                                f"{FORMAT_VERSION}): re-create the file with qcompile.compile(...).save()")
    start = _PREFIX.size + hlen
    if hlen > _MAX_HEADER or start > len(data):
        raise ArtifactFileError(f"{path}: the file is truncated or corrupt: its header claims {hlen} bytes but the "
                                f"file has {len(data)} bytes in all; copy the file again from its source")
    header = _json(path, data[_PREFIX.size:start], "header")
    entries = _entries(path, header)
    expected = start + header["payload_size"] + _TRAILER
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says (trailing bytes)"
        raise ArtifactFileError(f"{path}: the file is {what}: expected {expected} bytes, found {len(data)}; "
                                f"copy the file again from its source")
    if hashlib.sha256(data[:-_TRAILER]).digest() != data[-_TRAILER:]:
        raise ArtifactFileError(f"{path}: the file is corrupt: its SHA-256 checksum does not match its content; "
                                f"copy the file again from its source")
    out = {}
    for e in entries:
        blob = data[start + e["offset"]:start + e["offset"] + e["size"]]
        if hashlib.sha256(blob).hexdigest() != e["sha256"]:
            raise ArtifactFileError(f"{path}: entry {e['name']!r} is corrupt (SHA-256 mismatch)")
        out[e["name"]] = (blob, e)
    return out


def _entries(path: str, header) -> list[dict]:
    """Validate the entry table: known kinds, contiguous in-bounds extents, unique names."""
    bad = lambda why: ArtifactFileError(f"{path}: malformed header ({why}); the file is corrupt or not written "
                                        f"by qcompile")
    if not isinstance(header, dict) or header.get("format") != "qcompile" or not isinstance(header.get("entries"), list):
        raise bad("no qcompile entry table")
    size = header.get("payload_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad("payload_size")
    offset, names = 0, set()
    for e in header["entries"]:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or e["name"] in names:
            raise bad("an entry without a unique name")
        ints = [e.get(k) for k in ("offset", "size")]
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ints) or e["offset"] != offset:
            raise bad(f"entry {e['name']!r} extent")
        if e.get("kind") not in ("json", "tensor") or not isinstance(e.get("sha256"), str):
            raise bad(f"entry {e['name']!r} kind / checksum")
        names.add(e["name"])
        offset += e["size"]
    if offset != size:
        raise bad("entry sizes do not add up to payload_size")
    return header["entries"]


def read_json(path: str, entries: dict, name: str):
    blob, info = _entry(path, entries, name, "json")
    return _json(path, blob, name)


def read_tensor(path: str, entries: dict, name: str) -> torch.Tensor:
    """A tensor entry rebuilt from its raw bytes (never unpickled)."""
    blob, info = _entry(path, entries, name, "tensor")
    dtype, shape = DTYPES.get(info.get("dtype")), info.get("shape")
    if dtype is None or not isinstance(shape, list) or any(not isinstance(s, int) or isinstance(s, bool) or s < 0
                                                          for s in shape):
        raise ArtifactFileError(f"{path}: tensor entry {name!r} has an unsupported dtype or shape "
                                f"({info.get('dtype')!r}, {shape!r})")
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != len(blob):
        raise ArtifactFileError(f"{path}: tensor entry {name!r} holds {len(blob)} bytes, its dtype and shape "
                                f"need {numel * itemsize}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def _entry(path, entries, name, kind):
    if name not in entries:
        raise ArtifactFileError(f"{path}: the file has no {name!r} entry; it is corrupt or not a qcompile artifact")
    blob, info = entries[name]
    if info["kind"] != kind:
        raise ArtifactFileError(f"{path}: entry {name!r} should be {kind}, the file says {info['kind']}")
    return blob, info


def _json(path: str, blob: bytes, what: str):
    try:
        return json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactFileError(f"{path}: the {what} is not valid JSON ({type(e).__name__}); the file is corrupt "
                                f"or not written by qcompile") from None


def _sniff(path: str, data: bytes) -> str:
    """Say what a non-.qc file is, and what to do with it."""
    if not data:
        return "the file is empty (an interrupted copy?); copy the file again from its source"
    if len(data) < _PREFIX.size and MAGIC.startswith(data[:8]):
        return "the file is truncated; copy the file again from its source"
    if data[:4] == b"PK\x03\x04":
        return _sniff_zip(data)
    if data[4:6] == b"ET":  # the flatbuffer file identifier of ExecuTorch programs (ET12, ...)
        return ("this is an ExecuTorch program (.pte), not a qcompile artifact: run it with "
                "executorch.runtime.Runtime.get().load_program(path); qcompile.load reads .qc files "
                "(save the artifact with art.save('model.qc') to load it back into qcompile)")
    if path.lower().endswith(".onnx") or _is_onnx(data):
        return ("this is an ONNX model, not a qcompile artifact: run it with "
                "onnxruntime.InferenceSession(path); qcompile.load reads .qc files "
                "(save the artifact with art.save('model.qc') to load it back into qcompile)")
    if data[:1] == b"\x80":
        return "this is a Python pickle, not a qcompile artifact; qcompile never unpickles files"
    return "not a qcompile artifact (no QCOMPILE signature at the start of the file); qcompile.load reads .qc files"


def _is_onnx(data: bytes) -> bool:
    """An ONNX ModelProto starts with field 1 (ir_version, varint) and parses as one (protobuf: no code)."""
    if data[:1] != b"\x08":
        return False
    try:
        import onnx
        return len(onnx.load_model_from_string(data).graph.node) > 0
    except Exception:  # noqa: BLE001 - not ONNX, or onnx not installed
        return b"onnx" in data[:4096].lower()


def _sniff_zip(data: bytes) -> str:
    import io
    import zipfile
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        names = []
    if any(n.endswith("qcompile.json") for n in names):
        return ("this .qc file was written by an older qcompile (format 1, a torch.export archive, which can run "
                "code when loaded); qcompile no longer reads it: re-create it with qcompile.compile(...).save()")
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
        return ("this is a torch.export archive (.pt2), not a qcompile artifact; qcompile.load reads only .qc "
                "files (it never loads torch archives, which can run code)")
    if any(n.endswith("data.pkl") for n in names):
        return ("this is a torch.save (pickle) file, not a qcompile artifact; qcompile never unpickles files: "
                "compile the model with qcompile.compile(...) and save it as .qc")
    return "this is a zip archive, not a qcompile artifact; qcompile.load reads .qc files"
