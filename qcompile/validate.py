"""Input validation: bad models, example inputs, calibration samples and option values become qcompile
errors that name the input, what was expected and what to do -- checked before the model runs.

Calibration samples are checked against the example inputs the model was captured with: the same
structure (positional / keyword / nested dict), the same dtype, rank and non-batch dimensions, on the
CPU, non-empty and finite. See ``docs/trust.md``.
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings

import torch
from torch import nn
from torch.utils._pytree import keystr, tree_flatten_with_path

from .errors import CalibrationError, ConfigError, InputError, QCompileWarning

_BOOL_OPTIONS = ("strict",)


# -- the model -----------------------------------------------------------------------------------
def check_model(model: nn.Module) -> None:
    """Parameters and buffers must hold values on the CPU (the backends are CPU runtimes)."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.device.type == "meta":
                raise InputError(f"{type(model).__name__}'s {kind} '{name}' is on the meta device (it has no values): "
                                 f"load the weights first (e.g. model.load_state_dict(state, assign=True) or "
                                 f"model.to_empty(device='cpu') then load), then compile")
            if t.device.type != "cpu":
                raise InputError(f"{type(model).__name__}'s {kind} '{name}' is on {t.device}; qcompile's backends "
                                 f"run on the CPU: compile model.to('cpu') with CPU example inputs")


def warn_if_training(model: nn.Module, mode: str) -> None:
    """Post-training quantization captures the model in eval mode; say so when it is in training mode."""
    if model.training and mode != "qat":
        warnings.warn(f"{type(model).__name__} is in training mode; qcompile captures it for mode={mode!r} in eval "
                      f"mode (dropout off, batch-norm uses its running statistics), so the artifact matches "
                      f"model.eval(). Call model.eval() first to silence this, or use qcompile.prepare_qat to "
                      f"quantize while training.", QCompileWarning, stacklevel=3)


def adapt_dict_inputs(model: nn.Module, inputs):
    """A dict given as the example inputs of ``forward(self, batch)`` is one positional dict, not keywords."""
    if inputs.args or not inputs.kwargs:
        return inputs
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        has_var_kw = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return inputs
    names = {p.name for p in params}
    if len(params) == 1 and not has_var_kw and not set(inputs.kwargs) <= names:
        return dataclasses.replace(inputs, args=(dict(inputs.kwargs),), kwargs={})  # a CapturedInputs
    return inputs


def check_example_inputs(inputs) -> None:
    """Example inputs: CPU tensors with at least one element and finite values."""
    for path, t in _leaves(inputs.args, inputs.kwargs):
        if not isinstance(t, torch.Tensor):
            continue
        what = f"example input {path}"
        _check_tensor(t, what, InputError, "pass example inputs like one real batch")


# -- calibration samples --------------------------------------------------------------------------
def sample_to_inputs(sample, expected, index: int, names=()):
    """One calibration sample -> (args, kwargs) shaped like the example inputs. ``names``: the positional
    inputs' parameter names, so a dict sample of a positionally captured model maps onto them."""
    n = len(expected.args)
    if isinstance(sample, torch.Tensor):
        return (sample,), {}
    if isinstance(sample, dict):
        if not expected.kwargs and n == 1 and isinstance(expected.args[0], dict):
            return (sample,), {}  # forward(self, batch: dict)
        if not expected.kwargs and names and set(sample) <= set(names):
            return tuple(sample[k] for k in names if k in sample), {}
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        if n and len(sample) != n:
            raise CalibrationError(
                f"calibration sample {index} has {len(sample)} elements but the model takes {n} positional "
                f"input(s); for (input, label) pairs pass calibration=(x for x, _ in loader)")
        return tuple(sample), {}
    raise CalibrationError(f"calibration sample {index} is a {type(sample).__name__}; samples must be tensors, "
                           f"tuples of positional inputs or dicts of keyword inputs, like the example inputs")


def check_sample(args, kwargs, expected, index: int, what: str = "calibration sample", values: bool = True) -> None:
    """Structure, dtype, rank, non-batch dims of one sample vs the example; with ``values`` also device,
    size and finiteness."""
    got, exp = dict(_leaves(args, kwargs)), dict(_leaves(expected.args, expected.kwargs))
    if set(got) != set(exp):
        raise CalibrationError(f"{what} {index} has inputs {_names(got)}; the model was captured with "
                               f"{_names(exp)}: give every sample the structure of the example inputs")
    for path, e in exp.items():
        g = got[path]
        if not isinstance(e, torch.Tensor):
            continue
        label = f"{what} {index}, input {path}"
        if not isinstance(g, torch.Tensor):
            raise CalibrationError(f"{label} is a {type(g).__name__}; the example input there is a tensor")
        if g.dtype != e.dtype:
            hint = f"convert it with .to({e.dtype})" if e.is_floating_point() or not g.is_floating_point() else \
                f"pass {e.dtype} values like the example input"
            raise CalibrationError(f"{label} has dtype {g.dtype}; the model was captured with {e.dtype}: {hint}")
        if g.dim() != e.dim() or (e.dim() > 1 and tuple(g.shape[1:]) != tuple(e.shape[1:])):
            raise CalibrationError(f"{label} has shape {tuple(g.shape)}; the model was captured with "
                                   f"{tuple(e.shape)}: only dimension 0 (the batch) may differ")
        if values:
            _check_tensor(g, label, CalibrationError, "drop or fix that sample")


def check_call_inputs(args, kwargs, expected) -> None:
    """The inputs of a compiled artifact: same structure / dtype / non-batch dims as the example inputs."""
    try:
        check_sample(args, kwargs, expected, 0, what="call", values=False)
    except CalibrationError as e:
        raise InputError(str(e).replace("call 0, input", "input").replace("call 0", "the input")
                         .replace("every sample", "the inputs")) from None


def _check_tensor(t: torch.Tensor, label: str, error, fix: str) -> None:
    if t.device.type != "cpu":
        raise error(f"{label} is on {t.device}; qcompile's backends run on the CPU: pass tensor.cpu()")
    if t.numel() == 0:
        raise error(f"{label} is empty (shape {tuple(t.shape)}): {fix} with at least one element")
    if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise error(f"{label} holds {bad} NaN/Inf value(s) of {t.numel()}: quantization ranges need finite "
                    f"values; {fix}")


def _leaves(args, kwargs) -> list:
    """(readable path, leaf): positional inputs as args[0], args[0]['x'], keyword inputs as kwargs['mask']."""
    out = []
    for group, tree in (("args", tuple(args)), ("kwargs", dict(kwargs))):
        leaves, _ = tree_flatten_with_path(tree)
        out.extend((group + keystr(path), leaf) for path, leaf in leaves)
    return out


def _names(leaves: dict) -> str:
    return "[" + ", ".join(sorted(leaves)) + "]"


def check_outputs(gm, model) -> None:
    """A model must return at least one tensor computed from its inputs: that is what gets quantized."""
    from torch import fx

    from .errors import CaptureError
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    leaves = torch.utils._pytree.tree_leaves(out.args[0]) if out is not None else []
    if not any(isinstance(leaf, fx.Node) for leaf in leaves):
        what = "None" if all(leaf is None for leaf in leaves) else "no tensor computed from its inputs"
        raise CaptureError(f"{type(model).__name__}.forward returned {what}: "
                           f"qcompile quantizes the computation that produces a model's outputs; return the "
                           f"output tensor(s) from forward()")


# -- option values ---------------------------------------------------------------------------------
def check_options(opts) -> None:
    """Types of the keyword options (their values are checked where they are used)."""
    if not isinstance(opts.strict, bool):
        raise ConfigError(f"strict must be True or False, got {opts.strict!r}")
    if opts.quantize_outputs is not None and not isinstance(opts.quantize_outputs, bool):
        raise ConfigError(f"quantize_outputs must be True, False or None (the backend's default), "
                          f"got {opts.quantize_outputs!r}")
    for name in ("example_kwargs", "backend_options"):
        v = getattr(opts, name)
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"{name} must be a dict, got {type(v).__name__}")
    if opts.backend_options and any(not isinstance(k, str) for k in opts.backend_options):
        raise ConfigError("backend_options keys must be option names (str)")


def names_list(value, option: str) -> tuple:
    """exclude= / allow_float=: a list of names (or types / regexes); a bare string is one name."""
    if value is None:
        return ()
    if isinstance(value, (str, type)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(f"{option} must be a list of module names / types, got {type(value).__name__}") from None


def check_call_args(backend, calibration, verify, progress) -> None:
    """compile()'s own keyword arguments."""
    if not isinstance(backend, str) and not all(hasattr(backend, a) for a in ("name", "lower", "run")):
        raise ConfigError(f"backend must be a backend name ('x86', 'onnx', 'executorch') or a backend object, "
                          f"got {type(backend).__name__}")
    if not isinstance(verify, bool):
        raise ConfigError(f"verify must be True or False, got {verify!r}")
    if progress is not None and not isinstance(progress, bool):
        raise ConfigError(f"progress must be True, False or None, got {progress!r}")
    check_calibration(calibration)


def check_calibration(calibration) -> None:
    """The calibration argument itself: an iterable of samples (None: none given)."""
    if calibration is None:
        return
    if isinstance(calibration, torch.Tensor):
        raise CalibrationError("calibration is a single tensor; pass an iterable of samples, e.g. "
                               "calibration=[x] for one batch or calibration=list(x.split(16)) for several")
    if isinstance(calibration, (str, bytes, dict)) or not hasattr(calibration, "__iter__"):
        raise CalibrationError(f"calibration must be an iterable of samples (a list, a generator, a DataLoader "
                               f"yielding inputs), got {type(calibration).__name__}")
