"""The exported program inside a ``.qc`` file, written and read without pickle.

The graph is torch.export's JSON schema (``torch._export.serde.serialize``); tensors (state dict,
constants, example inputs) are raw entries of the container (``qcompile.serialize``) and reach torch's
deserializer as ready-made dicts, so its ``torch.load`` fallback is never reached. Before torch sees the
JSON, :func:`check_program` refuses everything in it that could run code: node targets other than
registered operators, symbolic expressions other than plain arithmetic on shape symbols (torch parses them
with ``sympy.sympify``, an ``eval``), names that are not identifiers (they become generated Python source),
guard code, and free-form node metadata.
"""
from __future__ import annotations

import io
import json
import math
import operator
import re
import tokenize

import torch

from .errors import ArtifactFileError
from .serialize import read_json, read_tensor, tensor_bytes

_NAME = re.compile(r"^[A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_OP_NAMESPACES = {"aten", "prims", "quantized_decomposed", "qcompile", "quantized"}
_HIGHER_ORDER = {"cond", "while_loop", "map_impl", "scan", "wrap_with_set_grad_enabled", "wrap_with_autocast"}
_SYM_NAMES = {"Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Eq", "Ne",
              "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "True", "False", "oo", "int_oo", "positive", "integer",
              "nonnegative", "real", "finite", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod",
              "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow",
              "FloatTrueDiv", "IntTrueDiv", "TruncToFloat", "TruncToInt", "ToFloat", "Identity", "OpaqueUnaryFn"}
_SYM_OPS_TOKENS = {"(", ")", ",", "=", "+", "-", "*", "/", "//", "%", "**", "<", ">", "<=", ">=", "==", "!=",
                   "&", "|", "~"}
_FREE_TEXT = {"metadata", "in_spec", "out_spec", "expr_str", "as_string", "as_strings", "torch_version",
              "guards_code", "stack_trace"}


def _python_targets() -> set[str]:
    from torch._export.serde.serialize import _SYM_OPS
    return {f"{getattr(f, '__module__', '') or ''}.{f.__name__}" for f in set(_SYM_OPS) | {operator.getitem}} | {
        f"_operator.{f.__name__}" for f in set(_SYM_OPS) | {operator.getitem} if f.__module__ == "_operator"} | {
        f"math.{f.__name__}" for f in (math.trunc, math.floor, math.ceil)}


# -- writing ------------------------------------------------------------------------------------
def program_entries(ep) -> tuple[list, dict]:
    """(container entries, JSON description of the example inputs) for an ExportedProgram."""
    from torch._export.serde.serialize import serialize
    ep._guards_code = []  # guards become generated code on load: a qcompile file never carries them
    art = serialize(ep, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
    entries = [("program.json", art.exported_program, {"kind": "json"})]
    names = {}
    for group, tensors in (("state_dict", ep.state_dict), ("constants", ep.constants)):
        names[group] = []
        for i, (key, t) in enumerate(tensors.items()):
            if not isinstance(t, torch.Tensor):
                raise ArtifactFileError(f"cannot save {group} entry {key!r} of type {type(t).__name__}: "
                                        f"a .qc file stores tensors only")
            entries.append(_tensor_entry(f"{group}/{i}", t))
            names[group].append(key)
    example = []
    args, kwargs = ep.example_inputs if ep.example_inputs is not None else ((), {})
    desc = {"args": _describe(list(args), entries, example), "kwargs": _describe(dict(kwargs), entries, example)}
    return entries, {"tensor_names": names, "example_inputs": desc}


def _tensor_entry(name: str, t: torch.Tensor):
    data, info = tensor_bytes(t)
    return name, data, dict(info, kind="tensor", requires_grad=bool(getattr(t, "requires_grad", False)),
                            parameter=isinstance(t, torch.nn.Parameter))


def _describe(value, entries: list, counter: list):
    """Example inputs as JSON: tensors become {"tensor": entry name}; containers recurse."""
    if isinstance(value, torch.Tensor):
        name = f"example/{len(counter)}"
        counter.append(name)
        entries.append(_tensor_entry(name, value))
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": {str(k): _describe(v, entries, counter) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_describe(v, entries, counter) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise ArtifactFileError(f"cannot save an example input of type {type(value).__name__} in a .qc file")


# -- reading ------------------------------------------------------------------------------------
def load_program(path: str, entries: dict, layout: dict):
    """Rebuild the ExportedProgram of a checked container; refuse anything that could run code."""
    from torch._export.serde.serialize import SerializedArtifact, deserialize
    from . import lowbit  # noqa: F401 - registers the qcompile:: custom ops a reference graph may call
    program = read_json(path, entries, "program.json")
    try:
        check_program(path, program)
    except RecursionError:
        raise ArtifactFileError(f"{path}: the program entry is nested too deeply; the file is corrupt or crafted") \
            from None
    tensors = {}
    for group in ("state_dict", "constants"):
        keys = layout.get("tensor_names", {}).get(group, [])
        if not isinstance(keys, list) or any(not isinstance(k, str) or not _NAME.match(k) for k in keys):
            raise ArtifactFileError(f"{path}: malformed {group} names in the manifest")
        tensors[group] = {k: _read_tensor(path, entries, f"{group}/{i}") for i, k in enumerate(keys)}
    desc = layout.get("example_inputs", {})
    example = (tuple(_rebuild(path, entries, desc.get("args", {"tuple": []}))),
               _rebuild(path, entries, desc.get("kwargs", {"dict": {}})))
    if not isinstance(example[1], dict):
        raise ArtifactFileError(f"{path}: malformed example inputs in the manifest")
    blob = json.dumps(program).encode()
    try:
        ep = deserialize(SerializedArtifact(blob, tensors["state_dict"], tensors["constants"], example))
    except Exception as e:  # noqa: BLE001 - any failure of torch's deserializer: a file we refuse
        raise ArtifactFileError(f"{path}: the graph in the file could not be rebuilt ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); the file is corrupt or was "
                                f"written by an incompatible torch version") from None
    check_graph(path, ep.graph_module)
    check_tensors(path, ep)
    return ep


def check_tensors(path: str, ep) -> None:
    """Every stored weight / buffer / constant has the dtype and shape its placeholder in the graph says."""
    from torch.export.graph_signature import InputKind
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    leaves = iter(torch.utils._pytree.tree_leaves(ep.example_inputs or ((), {})))
    for spec in ep.graph_signature.input_specs:
        v = vals.get(getattr(spec.arg, "name", None))
        if spec.kind == InputKind.USER_INPUT:
            if isinstance(v, torch.Tensor):
                t = next(leaves, None)
                if not isinstance(t, torch.Tensor) or t.dtype != v.dtype or t.dim() != v.dim() or any(
                        isinstance(s, int) and s != int(n) for s, n in zip(v.shape, t.shape)):
                    raise ArtifactFileError(f"{path}: stored example input {spec.arg.name!r} does not match the "
                                            f"graph; the file is corrupt or crafted")
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            continue
        t = ep.state_dict.get(spec.target) if spec.target in ep.state_dict else ep.constants.get(spec.target)
        if not isinstance(t, torch.Tensor) or not isinstance(v, torch.Tensor) or t.dtype != v.dtype or \
                [int(s) for s in t.shape] != [int(s) if isinstance(s, int) else -1 for s in v.shape]:
            raise ArtifactFileError(f"{path}: stored tensor {spec.target!r} does not match the graph "
                                    f"(expected {getattr(v, 'dtype', None)} {list(getattr(v, 'shape', []))}, "
                                    f"found {getattr(t, 'dtype', None)} {list(getattr(t, 'shape', []))}); "
                                    f"the file is corrupt or crafted")


def _read_tensor(path, entries, name):
    t, info = read_tensor(path, entries, name), entries[name][1]
    if not (info.get("requires_grad") or info.get("parameter") is True):
        return t  # a frozen parameter (requires_grad=False, e.g. Whisper's positions) is still a Parameter
    return torch.nn.Parameter(t, requires_grad=t.is_floating_point() and info.get("requires_grad", False) is True)


def _rebuild(path: str, entries: dict, d):
    if not isinstance(d, dict) or len(d) != 1:
        raise ArtifactFileError(f"{path}: malformed example inputs in the manifest")
    (kind, v), = d.items()
    if kind == "tensor":
        return read_tensor(path, entries, str(v))
    if kind == "dict" and isinstance(v, dict):
        return {k: _rebuild(path, entries, x) for k, x in v.items()}
    if kind in ("tuple", "list") and isinstance(v, list):
        items = [_rebuild(path, entries, x) for x in v]
        return tuple(items) if kind == "tuple" else items
    if kind == "value" and (v is None or isinstance(v, (bool, int, float, str))):
        return v
    raise ArtifactFileError(f"{path}: malformed example inputs in the manifest")


def check_program(path: str, program) -> None:
    """Refuse program JSON holding anything that could run code; strip free-form node metadata."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise ArtifactFileError(f"{path}: the program entry is not a torch.export program")
    if program.get("guards_code"):
        raise ArtifactFileError(f"{path}: the program carries guard code; a qcompile file never does "
                                f"(the file was crafted or corrupted): refusing to load it")
    program["graph_module"]["metadata"] = {}
    _walk(path, program["graph_module"], "graph_module")
    for key in program.get("range_constraints", {}) or {}:
        _check_name(path, key, "range constraint")


def _walk(path: str, x, where: str) -> None:
    if isinstance(x, list):
        for v in x:
            _walk(path, v, where)
        return
    if not isinstance(x, dict):
        if isinstance(x, str) and not (where.startswith("as_float") and x in _FLOAT_SPECIALS):
            _check_name(path, x, where)  # torch writes a float inf / nan (an attention mask's -inf) as a string
        return
    if {"target", "inputs", "outputs"} <= set(x):  # a graph node
        _check_target(path, x["target"])
        meta = x.get("metadata") if isinstance(x.get("metadata"), dict) else {}
        stack = meta.get("nn_module_stack")
        x["metadata"] = {"nn_module_stack": stack} if isinstance(stack, str) and "\n" not in stack else {}
    for k, v in x.items():
        _check_name(path, k, where)
        if k == "expr_str":
            _check_sym_expr(path, v)
        elif k == "target" and isinstance(v, str) and {"inputs", "outputs"} <= set(x):
            continue
        elif k not in _FREE_TEXT:
            _walk(path, v, k)


_FLOAT_SPECIALS = ("Infinity", "-Infinity", "NaN")


def _check_name(path: str, s, where: str) -> None:
    if not isinstance(s, str) or not _NAME.match(s):
        raise ArtifactFileError(f"{path}: refusing to load: {where} {str(s)[:60]!r} is not a plain name "
                                f"(the file was crafted or corrupted)")


def _check_target(path: str, target) -> None:
    ok = isinstance(target, str) and (target in _python_targets() or _is_operator(target))
    if not ok:
        raise ArtifactFileError(f"{path}: refusing to load: the graph calls {str(target)[:80]!r}, which is not a "
                                f"registered torch operator (the file was crafted or corrupted)")


def _is_operator(target: str) -> bool:
    parts = target.split(".")
    if len(parts) < 4 or parts[:2] != ["torch", "ops"] or not all(p.isidentifier() for p in parts):
        return False
    ns = parts[2]
    if ns == "higher_order":
        return len(parts) == 4 and parts[3] in _HIGHER_ORDER
    if ns not in _OP_NAMESPACES or len(parts) != 5:
        return False
    try:
        op = getattr(getattr(getattr(torch.ops, ns), parts[3]), parts[4])
    except (AttributeError, RuntimeError):
        return False
    return isinstance(op, torch._ops.OpOverload)


def _check_sym_expr(path: str, expr) -> None:
    """A shape expression torch will hand to sympy.sympify (an eval): names from a fixed list, shape
    symbols, numbers and arithmetic only."""
    bad = ArtifactFileError(f"{path}: refusing to load: the shape expression {str(expr)[:80]!r} is not plain "
                            f"arithmetic on shape symbols (the file was crafted or corrupted)")
    if not isinstance(expr, str) or len(expr) > 10_000:
        raise bad
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expr).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        raise bad from None
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.NUMBER):
            continue
        if tok.type == tokenize.NAME and (tok.string in _SYM_NAMES or re.fullmatch(r"[a-z]\d+", tok.string)):
            continue
        if tok.type == tokenize.STRING and re.fullmatch(r"'[a-z]\d+'|\"[a-z]\d+\"", tok.string):
            continue
        if tok.type == tokenize.OP and tok.string in _SYM_OPS_TOKENS:
            continue
        raise bad


def check_graph(path: str, gm) -> None:
    """After rebuilding: every call is a registered operator or a whitelisted Python function."""
    allowed = {f for f in _allowed_callables()}
    for mod in gm.modules():
        if not isinstance(mod, torch.fx.GraphModule):
            continue
        for node in mod.graph.nodes:
            if node.op == "call_function" and not (isinstance(node.target, torch._ops.OpOverload)
                                                   or isinstance(node.target, torch._ops.HigherOrderOperator)
                                                   or node.target in allowed):
                raise ArtifactFileError(f"{path}: refusing to load: node {node.name!r} calls {node.target!r}")
            if node.op in ("call_method", "call_module") and mod is gm:
                raise ArtifactFileError(f"{path}: refusing to load: node {node.name!r} is a {node.op}")


def _allowed_callables():
    from torch._export.serde.serialize import _SYM_OPS
    return set(_SYM_OPS) | {operator.getitem, math.floor, math.ceil}
