"""What the CLI reads: models (``module:factory``, a local Hugging Face folder), data (image folders,
.npy / .pt tensors, ``module:callable``) and saved artifacts (.qc, .onnx, .pte). Nothing here unpickles."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

from .errors import InputError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
EXPORT_EXTS = (".pt2", ".ep", ".pte2")
DATA_BATCH = 8


def _is_spec(s: str) -> bool:
    mod, sep, attr = s.partition(":")
    return bool(sep and mod and attr and not os.path.exists(s) and "/" not in mod)


def import_attr(spec: str):
    """``package.module:name`` -> the object (the current directory is importable, as with python -m)."""
    mod, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise InputError(f"cannot import {mod!r} for {spec!r}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{mod!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


# -- models -----------------------------------------------------------------------------------------
def load_model(spec: str, seq_len: int = 32):
    """(model, example inputs tuple, kwargs dict) from ``module:factory`` or a Hugging Face folder."""
    if _is_spec(spec):
        made = import_attr(spec)()
        if not (isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
            raise InputError(f"{spec} must return (model, example_inputs), got {type(made).__name__}")
        model, example = made
        if isinstance(example, torch.Tensor):
            example = (example,)
        if isinstance(example, dict):
            return model.eval(), (), dict(example)
        return model.eval(), tuple(example), {}
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_model(path, seq_len)
    if path.suffix in EXPORT_EXTS or (path.is_file() and path.suffix in (".pt", ".pth")):
        raise InputError(f"{spec}: saved torch.export programs / pickled models are not accepted: torch.export.load "
                         f"can unpickle parts of the archive, which runs code; give a module:factory instead")
    raise InputError(f"MODEL must be package.module:factory or a Hugging Face model folder, got {spec!r}")


def _hf_model(path: Path, seq_len: int):
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise InputError("a Hugging Face folder needs transformers: pip install 'qcompile[hf]'") from e
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not list(path.glob("*.safetensors")):
        raise InputError(f"{path}: no .safetensors weights (pickled .bin weights are not loaded)")
    model = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                      attn_implementation="eager")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: no tokenizer to build example inputs ({e}); use a module:factory") from e
    enc = tok(["qcompile example input sentence."] * 2, padding="max_length", truncation=True,
              max_length=seq_len, return_tensors="pt")
    return model.eval(), (enc["input_ids"], enc["attention_mask"]), {}


# -- data -------------------------------------------------------------------------------------------
def load_data(spec: str, example: tuple):
    """A tensor, a {"inputs": ..., "targets": ...} dict, or a list of batches."""
    if _is_spec(spec):
        data = import_attr(spec)
        return data() if callable(data) else data
    path = Path(spec)
    if path.is_dir():
        return _images(path, example)
    if not path.is_file():
        raise InputError(f"no such data file or folder: {spec}")
    if path.suffix == ".npy":
        import numpy as np
        return _cast(torch.from_numpy(np.load(path, allow_pickle=False)), example)
    if path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - the weights-only unpickler refuses anything but tensors
            raise InputError(f"{spec}: not a tensor file torch.load(weights_only=True) accepts ({e})") from e
        if isinstance(obj, torch.Tensor):
            return _cast(obj, example)
        if isinstance(obj, dict) and "inputs" in obj:
            return dict(obj, inputs=_cast(obj["inputs"], example) if isinstance(obj["inputs"], torch.Tensor)
                        else obj["inputs"])
        if isinstance(obj, (list, tuple)):
            return list(obj)
        raise InputError(f"{spec}: expected a tensor, a list of batches or a dict with 'inputs'")
    raise InputError(f"DATA must be an image folder, a .npy / .pt file or package.module:callable, got {spec!r}")


def _cast(t: torch.Tensor, example: tuple) -> torch.Tensor:
    ref = example[0] if example and isinstance(example[0], torch.Tensor) else None
    if ref is not None and t.dim() == ref.dim() - 1:
        t = t.unsqueeze(0)
    return t.to(ref.dtype) if ref is not None and t.is_floating_point() == ref.is_floating_point() else t


def _images(folder: Path, example: tuple) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError as e:
        raise InputError("image folders need Pillow: pip install pillow") from e
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_EXTS)})")
    ref = example[0] if example else None
    if not (isinstance(ref, torch.Tensor) and ref.dim() == 4):
        raise InputError("an image folder needs a model whose first input is an image batch [N, C, H, W]")
    c, h, w = ref.shape[1:]
    out = []
    for f in files:
        img = Image.open(f).convert("L" if c == 1 else "RGB").resize((w, h))
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(h, w, -1).permute(2, 0, 1)
        out.append(t.to(ref.dtype) / 255.0)
    return torch.stack(out)


def as_batches(data) -> list:
    """Calibration samples: a tensor is split into batches of DATA_BATCH rows."""
    if isinstance(data, torch.Tensor):
        return [data[i:i + DATA_BATCH] for i in range(0, len(data), DATA_BATCH)]
    if isinstance(data, dict) and "inputs" in data:
        return as_batches(data["inputs"])
    return list(data)
