"""Pass contract and pass manager.

A pass is ``call(gm) -> PassResult(gm, modified)``; ``modified`` is truthful. Passes hold no global
state: configuration goes through ``__init__``.

A pass declares the graph properties it ``requires`` and ``ensures`` (``PROPERTIES``); the pass manager
records the properties a graph has in ``gm.meta`` and raises a PassError naming the pass and the missing
property before running a pass whose requirement does not hold.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import fx

from qcompile import meta
from qcompile.errors import QCompileError


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


# the graph properties passes require / ensure, in pipeline order
PROPERTIES = {
    "captured": "an ATen graph from qcompile's capture (torch.export), inputs recorded",
    "normalized": "canonical ATen ops (Normalize)",
    "annotated": "every node carries the backend's quantization annotation or a float reason (Annotate)",
    "observed": "observers (PTQ) or fake-quants (QAT) sit where the annotation asks",
    "reference": "the quantize / dequantize reference graph (ConvertToReference)",
}


def graph_properties(gm: fx.GraphModule) -> frozenset:
    """The properties ``gm`` is known to have."""
    return frozenset(meta.PROPERTIES.get(gm, ()))


def establish(gm: fx.GraphModule, *properties: str) -> None:
    """Record that ``gm`` has ``properties`` (the pipeline does this after capture)."""
    unknown = set(properties) - set(PROPERTIES)
    if unknown:
        raise PassError(f"unknown graph propert(ies) {sorted(unknown)}; known: {sorted(PROPERTIES)}")
    meta.PROPERTIES.set(gm, graph_properties(gm) | frozenset(properties))


class Pass:
    """Base class. Subclasses implement :meth:`call`; ``in_place`` documents whether ``gm`` is edited;
    ``requires`` / ``ensures`` name graph properties (``PROPERTIES``) checked by the pass manager."""

    in_place: bool = True
    requires: frozenset = frozenset()
    ensures: frozenset = frozenset()

    @property
    def name(self) -> str:
        return type(self).__name__

    def call(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return self.call(gm)


class FunctionPass(Pass):
    """Wrap ``fn(gm) -> bool`` (returns modified) as a pass."""

    def __init__(self, fn: Callable[[fx.GraphModule], bool], name: str | None = None, requires=(), ensures=()):
        self._fn, self._name = fn, name or fn.__name__
        self.requires, self.ensures = frozenset(requires), frozenset(ensures)

    @property
    def name(self) -> str:
        return self._name

    def call(self, gm):
        return PassResult(gm, bool(self._fn(gm)))


class PassError(QCompileError):
    pass


@dataclass
class PassManager:
    """Run passes in order. ``verify`` lints the graph after each pass; ``dump_dir`` writes ``gm.code``
    before and after each pass; ``log`` records (pass name, modified, seconds)."""

    passes: Sequence[Pass]
    verify: bool = True
    dump_dir: str | None = None
    print_graphs: bool = False
    log: list = field(default_factory=list)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified_any = False
        self._dump(gm, 0, "input")
        for i, p in enumerate(self.passes, 1):
            self._check_requires(gm, p)
            t0 = time.perf_counter()
            try:
                res = p(gm)
            except QCompileError:
                raise
            except Exception as e:  # name the passes that ran before the failure
                ran = ", ".join(name for name, *_ in self.log) or "none"
                raise PassError(f"pass '{p.name}' failed: {e} (passes that ran before it: {ran})") from e
            gm = res.graph_module
            if self.verify:
                gm.graph.lint()
            if res.modified:
                gm.recompile()
            modified_any |= res.modified
            if p.ensures:
                establish(gm, *p.ensures)
            self.log.append((p.name, res.modified, time.perf_counter() - t0))
            self._dump(gm, i, p.name)
            if self.print_graphs:
                print(f"# after {p.name} (modified={res.modified})\n{gm.code}")
        return PassResult(gm, modified_any)

    def _check_requires(self, gm, p) -> None:
        missing = sorted(set(getattr(p, "requires", ())) - graph_properties(gm))
        if missing:
            ran = ", ".join(name for name, *_ in self.log) or "none"
            raise PassError(f"pass '{p.name}' requires the graph to be {missing} "
                            f"({'; '.join(PROPERTIES.get(m, '?') for m in missing)}), which no earlier pass ensured "
                            f"(passes that ran before it: {ran}); run it at a later hook or after the pass that "
                            f"establishes it")

    def _dump(self, gm, index, name):
        if not self.dump_dir:
            return
        os.makedirs(self.dump_dir, exist_ok=True)
        with open(os.path.join(self.dump_dir, f"{index:02d}_{name}.py"), "w") as f:
            f.write(gm.code)
