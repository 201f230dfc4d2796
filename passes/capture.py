"""Capture: nn.Module + example inputs -> torch.fx GraphModule of ATen ops (via torch.export).

The user's model is never mutated: capture works on a deep copy. Failures become CaptureError /
InputError naming the user's source line and a suggested fix.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import traceback
from dataclasses import dataclass

import torch
from torch import fx, nn

from qcompile import meta
from qcompile.errors import CaptureError, InputError

from .infra import establish

_HINTS = [
    ("data-dependent", "the model branches on tensor *values*: use torch.cond, or make the branch depend on "
                       "shapes/constants, or exclude this submodule from quantization"),
    ("Could not guard", "control flow depends on input values: rewrite it with torch.where / torch.cond"),
    ("item", "a tensor value is read with .item() / int(tensor): keep it a tensor or pass it as a constant"),
    ("Proxy", "the model manipulates graph proxies (symbolic tracing); torch.export should be used instead"),
    ("Unsupported", "an unsupported Python construct was hit; move it out of forward() or wrap the "
                    "submodule so it is not traced"),
]


@dataclass(frozen=True)
class CapturedInputs:
    args: tuple
    kwargs: dict


def normalize_inputs(example_inputs, example_kwargs=None) -> CapturedInputs:
    """Accept a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, dict):
        args, kwargs = (), {**example_inputs, **kwargs}
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    elif example_inputs is None:
        raise InputError("example_inputs is None: pass a sample input (a tensor, a tuple of tensors, or a dict)")
    else:
        raise InputError(f"example_inputs must be a tensor, a tuple/list or a dict, got {type(example_inputs).__name__}")
    return CapturedInputs(args, kwargs)


def contiguous_inputs(inputs: CapturedInputs) -> CapturedInputs:
    """The example inputs with standard (row-major) strides. A channels-last or permuted example (an
    image pipeline's ``torch.from_numpy(hwc).permute(2, 0, 1)``) would otherwise be baked into the
    exported graph as its layout, which a runtime handed another layout reads wrongly (ExecuTorch)
    or cannot plan (XNNPACK); artifacts copy each call's inputs to this layout too."""
    def fix(t):
        return t.contiguous() if isinstance(t, torch.Tensor) else t
    args, kwargs = torch.utils._pytree.tree_map(fix, (inputs.args, inputs.kwargs))
    return CapturedInputs(tuple(args), dict(kwargs))


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch / qcompile: the user's line."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename and "/qcompile/" not in f.filename
            and "/passes/" not in f.filename and "/site-packages/" not in f.filename]
    if not user:
        return None
    f = user[-1]
    return f'File "{f.filename}", line {f.lineno}, in {f.name}: {f.line}'


def _source_line_from_message(msg: str) -> str | None:
    for line in msg.splitlines():
        s = line.strip()
        if s.startswith("File ") and "/torch/" not in s and "site-packages" not in s:
            return s
    return None


def _hint(msg: str) -> str:
    for key, hint in _HINTS:
        if key.lower() in msg.lower():
            return hint
    return ("check that forward() runs on the example inputs; exclude the offending submodule "
            "(exclude=[...]) or rewrite the construct torch.export cannot capture")


def check_runs(model: nn.Module, inputs: CapturedInputs) -> None:
    """Run the model once eagerly so bad example inputs give an InputError, not an export trace."""
    try:
        with torch.no_grad():
            model(*inputs.args, **inputs.kwargs)
    except Exception as e:  # noqa: BLE001 - reported with context
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in inputs.args]
        where = _user_frame(e)
        raise InputError(
            f"{type(model).__name__} failed to run on the example inputs {shapes}"
            f"{' ' + str(list(inputs.kwargs)) if inputs.kwargs else ''}: {type(e).__name__}: {str(e).splitlines()[0]}"
            + (f"\n  at {where}" if where else "")
            + "\n  fix: pass example_inputs with the shapes/dtypes forward() expects") from e


def _dynamic_batch(model, inputs: CapturedInputs):
    """dynamic_shapes for torch.export: dim 0 of every tensor input is AUTO. The structure must mirror
    the inputs: a tuple of the positional inputs, or (with keyword inputs) a dict by parameter name."""
    def spec(a):
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return {0: torch.export.Dim.AUTO}
        if isinstance(a, dict):
            return {k: spec(v) for k, v in a.items()}
        if isinstance(a, (tuple, list)):
            return type(a)(spec(v) for v in a)
        return None
    if not inputs.kwargs:
        return tuple(spec(a) for a in inputs.args)
    bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs).arguments
    return {name: spec(value) for name, value in bound.items()}


def capture(model: nn.Module, example_inputs, example_kwargs=None, *, train: bool = False,
            dynamic_batch: bool = True) -> fx.GraphModule:
    """Export a deep copy of ``model``; return its GraphModule (guards removed, metadata kept)."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"qcompile needs a torch.nn.Module, got {type(model).__name__}")
    from qcompile.validate import adapt_dict_inputs, check_example_inputs, check_model, check_outputs
    inputs = contiguous_inputs(adapt_dict_inputs(model, normalize_inputs(example_inputs, example_kwargs)))
    check_model(model)
    check_example_inputs(inputs)
    model = copy.deepcopy(model)
    model.eval()  # the input check runs in eval mode: a train-mode run would move batch-norm statistics
    with torch_output_hidden() as log:
        check_runs(model, inputs)
        model.train(train)
        try:
            ep = _export(model, inputs, dynamic_batch)
        except Exception as e:  # noqa: BLE001 - translated into an actionable error
            msg = str(e)
            where = _source_line_from_message(msg) or _user_frame(e)
            err = CaptureError(
                f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: "
                f"{msg.strip().splitlines()[0] if msg.strip() else ''}"
                + (f"\n  at {where}" if where else "")
                + f"\n  fix: {_hint(msg)}"
                + ("" if log is None else f"\n  (torch's log and partial graph: set {DEBUG_ENV}=1)"))
            err.torch_log = log.getvalue() if log is not None else ""
            raise err from e
    gm = ep.module()
    _drop_guards(gm)
    check_outputs(gm, model)
    meta.INPUTS.set(gm, inputs)
    meta.TRAIN.set(gm, bool(train))  # a training graph: its parameters are still trained (const_fold.py)
    establish(gm, "captured")
    return gm


DEBUG_ENV = "QCOMPILE_DEBUG"


@contextlib.contextmanager
def torch_output_hidden():
    """Hide torch's logging and the partial graphs torch.export prints to stderr while capturing (yields
    the captured stderr text); with QCOMPILE_DEBUG=1 everything is shown (yields None)."""
    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        yield None
        return
    names = [n for n in list(logging.root.manager.loggerDict) if n == "torch" or n.startswith("torch.")]
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.disabled for lg in loggers]
    buf = io.StringIO()
    try:
        for lg in loggers:
            lg.disabled = True
        with contextlib.redirect_stderr(buf):
            yield buf
    finally:
        for lg, was in zip(loggers, before):
            lg.disabled = was


def _doubled(a):
    """A batch-1 tensor as batch 2 (the same rows twice); other leaves unchanged."""
    if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 1:
        return torch.cat([a, a])
    if isinstance(a, dict):
        return {k: _doubled(v) for k, v in a.items()}
    if isinstance(a, (tuple, list)):
        return type(a)(_doubled(v) for v in a)
    return a


def _batch_one(inputs: CapturedInputs) -> bool:
    leaves = [t for t in torch.utils._pytree.tree_leaves((inputs.args, inputs.kwargs)) if isinstance(t, torch.Tensor)]
    return bool(leaves) and all(t.dim() > 0 and t.shape[0] == 1 for t in leaves)


def _export(model, inputs: CapturedInputs, dynamic_batch: bool):
    """torch.export with dim 0 of every input dynamic where the model allows it, else static shapes.

    An example of batch 1 is traced as batch 2 (its rows twice): torch.export specializes a dimension of size
    1 to the constant 1, so a model with ``x.view(x.size(0), -1)`` captured from one image would only ever run
    on one image (the artifact then failed on a batch with a shape error deep in a kernel)."""
    if dynamic_batch:
        tries = ([CapturedInputs(_doubled(inputs.args), _doubled(inputs.kwargs))] if _batch_one(inputs) else []) + [inputs]
        for trial in tries:
            try:
                return torch.export.export(model, trial.args, trial.kwargs or None,
                                           dynamic_shapes=_dynamic_batch(model, trial), strict=False)
            except Exception:  # noqa: BLE001 - some models only export with static shapes
                pass
    return torch.export.export(model, inputs.args, inputs.kwargs or None, strict=False)


def _drop_guards(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()
