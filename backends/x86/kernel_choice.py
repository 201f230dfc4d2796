"""What the x86 CPU offers (``cpu_has_vnni``) and the per-layer choice of the int8 kernel family on it,
by measurement on the CPU at hand.

PyTorch ships two int8 CPU kernel families for conv / linear: fbgemm (AVX2 / AVX-512 VNNI) and oneDNN
(AVX-512 VNNI, AMX on Xeons that have it). Which one is faster depends on the CPU and on the layer's
shape (torch's own ``x86`` engine picks by a fixed heuristic). With ``X86Options(engine="auto")`` each
conv / linear is packed for every available family, timed on a tensor of its real input shape, and the
faster one kept; both compute the same int8 math (outputs within one step of each other).

Timings: interleaved rounds, the *minimum* per family (the machine is shared: the minimum is the least
disturbed figure). Choices are cached per CPU model, torch version, thread count and layer shape in
``$QCOMPILE_CACHE_DIR`` (default ``~/.cache/qcompile``) as JSON, so a model compiles the same way on the
same machine and a second compile measures nothing. The report names the family each layer runs on,
with the measured times.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch

FAMILIES = ("fbgemm", "onednn")
_CACHE_VERSION = 1


@contextlib.contextmanager
def quantized_engine(name: str):
    """PyTorch's quantized engine set for the block: weights packed inside it are for that kernel family
    (a packed weight keeps its family when it runs, whatever engine is set then)."""
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def cpu_has_vnni() -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def cache_path() -> str:
    root = os.environ.get("QCOMPILE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "qcompile")
    return os.path.join(root, "x86_kernel_choice.json")


def cpu_key() -> str:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}|torch {torch.__version__}|{torch.get_num_threads()} threads"


def available_families() -> tuple:
    return tuple(e for e in FAMILIES if e in torch.backends.quantized.supported_engines)


@dataclass
class Choice:
    family: str
    ms: dict  # family -> best measured milliseconds
    cached: bool = False

    def note(self) -> str:
        times = " / ".join(f"{k} {v:.3f}" for k, v in sorted(self.ms.items()))
        return f"{self.family}, measured {times} ms"  # the same words whether measured now or cached


@dataclass
class EngineChooser:
    """Measures and remembers which family runs a layer fastest. ``rounds`` interleaved timings each."""

    rounds: int = 5
    path: str = field(default_factory=cache_path)
    _cache: dict | None = None
    _dirty: bool = False

    def _load(self) -> dict:
        if self._cache is None:
            self._cache = {}
            try:
                with open(self.path) as f:
                    data = json.load(f)  # JSON only: a cache file never runs code
                if isinstance(data, dict) and data.get("version") == _CACHE_VERSION:
                    self._cache = {k: v for k, v in data.get("choices", {}).items() if isinstance(v, dict)}
            except (OSError, ValueError):
                pass
        return self._cache

    def choose(self, key: str, candidates: dict) -> Choice:
        """``candidates``: family -> zero-argument callable running the packed kernel once."""
        full = f"{cpu_key()}|{key}"
        hit = self._load().get(full)
        if hit and hit.get("family") in candidates:
            return Choice(hit["family"], dict(hit.get("ms", {})), cached=True)
        best = {k: float("inf") for k in candidates}
        for fn in candidates.values():
            fn()  # warm-up: first-call allocations, weight reorders
        for _ in range(self.rounds):
            for k, fn in candidates.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], (time.perf_counter() - t0) * 1e3)
        family = min(best, key=best.get)
        self._cache[full] = {"family": family, "ms": best}
        self._dirty = True
        return Choice(family, best)

    def save(self) -> None:
        """Write the cache atomically (a crash never leaves half a JSON file); errors only cost a re-measure."""
        if not self._dirty:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".kernel-choice-")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": _CACHE_VERSION, "choices": self._cache}, f, indent=0)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:
            pass


def example_input(anchor, weight: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor | None:
    """A quint8 tensor of the layer's real input shape (from the exported output shape), for timing."""
    from qcompile.ir import concrete_shape
    out = concrete_shape(anchor)  # the example's sizes; int() of a symbolic batch would specialize the graph
    if out is None:
        return None
    if weight.dim() == 4:  # conv: an input size that gives this output size
        stride, padding, dilation = (_arg(anchor, i, d) for i, d in ((3, [1, 1]), (4, [0, 0]), (5, [1, 1])))
        groups = int(_arg(anchor, 6, 1))
        hw = [(o - 1) * s - 2 * p + d * (k - 1) + 1
              for o, s, p, d, k in zip(out[2:], stride, padding, dilation, weight.shape[2:])]
        shape = (out[0], weight.shape[1] * groups, *hw)
        x = torch.rand(shape).contiguous(memory_format=torch.channels_last)
    else:
        x = torch.rand(*out[:-1], weight.shape[1])
    return torch.quantize_per_tensor(x * 255 * scale, scale, zero_point, torch.quint8)


def _arg(node, i, default):
    names = {3: "stride", 4: "padding", 5: "dilation", 6: "groups"}
    v = node.args[i] if len(node.args) > i else node.kwargs.get(names[i], default)
    return list(v) if isinstance(v, (list, tuple)) else v


def cpu_has_avx512_vnni() -> bool:
    """AVX-512 VNNI specifically (what torch's x86 engine checks before it picks oneDNN for a conv)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_vnni" in f.read()
    except OSError:
        return False


def engine_family(engine: str, kind: str, groups: int, weight_symmetric: bool) -> str:
    """The kernel family a weight packed under ``engine`` runs on, and why. For torch's "x86" engine this
    is its fixed rule (ATen quantized/cpu: ``QLinearPackWeightInt8`` packs every linear for fbgemm;
    ``should_use_onednn_quant`` sends a conv to oneDNN when the CPU has AVX-512 VNNI, groups <= 100, the
    weights are symmetric and there is no output padding)."""
    if engine != "x86":
        return f"{engine}: engine={engine!r} chosen in the backend options"
    if kind == "linear":
        return "fbgemm: torch's x86 engine packs every int8 linear for fbgemm"
    if not cpu_has_avx512_vnni():
        return "fbgemm: torch's x86 engine uses oneDNN for convs only on AVX-512 VNNI CPUs"
    if groups > 100:
        return f"fbgemm: torch's x86 engine keeps convs with {groups} > 100 groups on fbgemm"
    if not weight_symmetric:
        return "fbgemm: torch's x86 engine needs symmetric weights for oneDNN"
    return "onednn: torch's x86 engine (AVX-512 VNNI, symmetric weights, <= 100 groups)"
