"""Prove a lowered program on ExecuTorch's runtime before ``compile`` returns.

A ``.pte`` that ExecuTorch builds can still fail when it is loaded (XNNPACK rejects a node while
compiling the delegate) or run (a portable kernel rejects its operands). Both happen in C++ and are
logged to the process's stderr; the Python exception only says "error 0x12". ``prove`` loads the
program and runs it once on the example inputs with stderr captured, and turns a failure into a
``QCompileError`` naming the node(s), their module and source line, and what to do.

``mixed_dim_orders``: a tensor in channels-last dim order reaching a node outside the XNNPACK delegate
(ExecuTorch's portable kernels reject operands whose dim orders differ). The lowering then redoes the
export without the channels-last input transpose (lower.channels_last_inputs).
"""
from __future__ import annotations

import io
import os
import re
import sys
import tempfile
from contextlib import contextmanager

import torch
from torch import fx

from qcompile import meta
from qcompile.errors import QCompileError

from .delegation import TAG

_BOOKKEEPING = ("getitem", "executorch_call_delegate")


@contextmanager
def captured_stderr():
    """Collect the runtime's log into ``lines``: what C++ writes to file descriptor 2, and what the
    pybindings route to Python's ``sys.stderr`` (which is not fd 2 under pytest or in a notebook)."""
    lines: list[str] = []
    saved, py_saved, py_log = os.dup(2), sys.stderr, io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        sys.stderr = py_log
        try:
            yield lines
        finally:
            sys.stderr = py_saved
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", "replace").splitlines())
            lines.extend(py_log.getvalue().splitlines())


def _outside_delegate(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op == "call_function" and not any(b in str(node.target) for b in _BOOKKEEPING) \
                and "getitem" not in getattr(node.target, "__name__", ""):
            yield node


def mixed_dim_orders(gm: fx.GraphModule) -> list[str]:
    """Edge nodes outside the delegate whose operands or result are not in the default dim order."""
    bad = []
    for node in _outside_delegate(gm):
        vals = [a.meta.get("val") for a in node.all_input_nodes] + [node.meta.get("val")]
        orders = {tuple(v.dim_order()) for v in vals if isinstance(v, torch.Tensor)}
        if any(o != tuple(range(len(o))) for o in orders):
            bad.append(node.name)
    return bad


def _culprits(log: list[str], edge_gm: fx.GraphModule, reference: fx.GraphModule) -> list[fx.Node]:
    """Reference nodes the runtime log points at: a failing portable operator, or an XNNPACK node kind."""
    text = "\n".join(log)
    ops = re.findall(r"in operator aten::(\w+?)(?:_copy)?\.\w+", text)
    kinds = re.findall(r"Failed to create (\D+?)\d* node", text)
    names = []
    for node in edge_gm.graph.nodes:
        target = str(node.target)
        if any(f"aten.{op}" in target for op in ops):
            names.append(meta.custom_get(node, TAG))
    by_name = {n.name: n for n in reference.graph.nodes}
    found = [by_name[n] for n in dict.fromkeys(names) if n in by_name]
    for kind in kinds:
        found += [n for n in reference.graph.nodes if n.op == "call_function" and kind in str(n.target).split(".")[1:2]]
    return list(dict.fromkeys(found))


def model_frames(error: Exception) -> str:
    """The first line of ``error`` and the model source lines torch quotes in it ("File ..., in forward"),
    innermost last, leaving out torch's and ExecuTorch's own frames."""
    lines = str(error).strip().splitlines()
    frames = [ln.strip() for ln in lines if ln.strip().startswith("File ")
              and not any(p in ln for p in ("/torch/", "/executorch/", "/qcompile/", "<string>"))]
    head = lines[0] if lines else ""
    return head + "".join(f"\n  at {f}" for f in frames[-3:])


def describe(node: fx.Node) -> str:
    from qcompile.ir import module_path
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    where = next((t.strip() for t in reversed(trace) if t.strip().startswith("File ")), "")
    return f"{node.name} ({node.target}) in module '{module_path(node) or '<top>'}'" + (f" at {where}" if where else "")


def prove(program, inputs: list, edge_gm: fx.GraphModule, reference: fx.GraphModule, run: bool = True) -> None:
    """Load ``program`` (a PteProgram) and, with ``run``, execute it once on ``inputs``."""
    with captured_stderr() as log:
        try:
            program.method  # noqa: B018 - loading is the check
            if run:
                program.run(*inputs)
            error = None
        except Exception as e:  # noqa: BLE001 - re-raised below with the runtime's log
            error = e
    if error is None:
        return
    stage = "load" if program._method is None else "run"
    runtime_lines = [line for line in log if "Check failed" in line or "Failed" in line or "failed" in line][:6]
    nodes = _culprits(log, edge_gm, reference)
    named = "\n".join(f"  node: {describe(n)}" for n in nodes[:5]) or "  node: (the runtime log names none)"
    raise QCompileError(
        f"executorch backend: the compiled program fails to {stage} in ExecuTorch's runtime: "
        f"{type(error).__name__}: {error}\n" + named + "\n"
        + "".join(f"  runtime: {line.strip()}\n" for line in runtime_lines)
        + "  fix: exclude the module named above (exclude=['<module>']) so it stays float, or compile for "
          "another backend (backend='x86' or 'onnx')") from error
