"""Insert fake-quantization (QAT) for every annotated activation, weight and fixed-range output.

Activations reuse :class:`~qcompile.passes.insert_observers.InsertObservers` with a fake-quant factory,
so shared-parameter classes (max-pool, reshape...) share one module and convert turns each one into a
quantize / dequantize pair from its ``calculate_qparams()`` exactly as for PTQ observers.

Weights get a fake-quant on the weight edge of the annotated node (``call_module`` in front of the
constant, or of the constant expression ``w * sf`` of a conv-BN under QAT). At convert,
:class:`MaterializeWeightFakeQuant` replaces each one by its fake-quantized value as a constant carrying
the fake-quant's parameters (``node.meta[WEIGHT_QPARAMS]``), which ``ConvertToReference`` uses instead of
recomputing them: a learned (LSQ) or frozen scale reaches the backend, and the integers are exactly the
ones training used (the value already sits on the grid, so quantizing it again cannot round differently).

Fixed-range outputs (sigmoid: FixedSpec) get a fake-quant with the fixed parameters during training;
convert removes it and inserts the same parameters itself.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import fx

from qcompile import meta
from qcompile import annotation as A
from qcompile.errors import ConfigError
from qcompile.fake_quant import FakeQuantize, make_fake_quant
from qcompile.ir import add_constant, copy_meta, get_attr_value, module_path
from qcompile.specs import FixedSpec, QuantSpec

from .infra import Pass, PassResult
from .insert_observers import InsertObservers

FIXED_FQ = meta.FIXED_FAKE_QUANT.name  # the key's string, for qcompile.qat (reads gm.meta[FIXED_FQ])


def eval_constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """Evaluate a node whose inputs are all constants (get_attr / call_function only), without grad."""
    env: dict[str, torch.Tensor] = {}

    def ev(n: fx.Node):
        if n.name not in env:
            if n.op == "get_attr":
                env[n.name] = get_attr_value(gm, n)
            elif n.op == "call_function":
                env[n.name] = n.target(*fx.node.map_arg(n.args, ev), **fx.node.map_arg(n.kwargs, ev))
            else:
                raise ValueError(f"{node.name} is not a constant expression: it depends on {n.op} {n.name}")
        return env[n.name]

    with torch.no_grad():
        return ev(node).detach()


def _is_constant(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    return node.op == "call_function" and all(_is_constant(a) for a in node.all_input_nodes)


def fake_quants(gm: fx.GraphModule) -> dict[str, FakeQuantize]:
    """Every FakeQuantize module of a prepared QAT graph, by module name."""
    return {name: m for name, m in gm.named_modules() if isinstance(m, FakeQuantize)}


class InsertActivationFakeQuant(Pass):
    """Fake-quant modules for annotated activation values / edges, and for fixed-range outputs."""
    requires, ensures = frozenset({"annotated"}), frozenset({"observed"})

    def __init__(self, learn_scale: bool = False, prefix: str = "fake_quant"):
        self.learn_scale, self.prefix = learn_scale, prefix

    def _make(self, spec: QuantSpec) -> FakeQuantize:
        # QAT tracks activation ranges with a moving average whatever the PTQ observer was
        return make_fake_quant(dataclasses.replace(spec, observer="moving_average"), learn_scale=self.learn_scale)

    def call(self, gm: fx.GraphModule) -> PassResult:
        gm = InsertObservers(self._make, prefix=self.prefix)(gm).graph_module
        meta.OBSERVED.setdefault(gm, {})
        fixed = meta.FIXED_FAKE_QUANT.setdefault(gm, [])
        for node in list(gm.graph.nodes):
            ann = A.get_annotation(node)
            if ann is not None and isinstance(ann.output_spec, FixedSpec):
                name = f"{self.prefix}_fixed_{len(fixed)}"
                gm.add_submodule(name, _fixed_fake_quant(ann.output_spec, f"{node.name} ({module_path(node) or 'top'})"))
                with gm.graph.inserting_after(node):
                    call = gm.graph.call_module(name, (node,))
                node.replace_all_uses_with(call, delete_user_cb=lambda u: u is not call)
                copy_meta(node, call)
                fixed.append(name)
        return PassResult(gm, True)


def _fixed_fake_quant(fs: FixedSpec, name: str) -> FakeQuantize:
    spec = QuantSpec(dtype=fs.dtype)
    if (spec.quant_min, spec.quant_max) != (fs.quant_min, fs.quant_max):
        raise ConfigError(f"{name}: fixed range [{fs.quant_min}, {fs.quant_max}] is not the full {fs.dtype} "
                          f"range; QAT cannot fake-quantize it")
    fq = FakeQuantize(spec, name).disable_observer()
    fq.scale.fill_(fs.scale)
    fq.zero_point.fill_(fs.zero_point)
    fq.initialized.fill_(1)
    return fq


class InsertWeightFakeQuant(Pass):
    """A fake-quant on the weight edge of each annotated node (initialised from the current weight)."""

    def __init__(self, learn_scale: bool = False, prefix: str = "weight_fake_quant"):
        self.learn_scale, self.prefix = learn_scale, prefix

    def call(self, gm: fx.GraphModule) -> PassResult:
        table = meta.WEIGHT_FAKE_QUANT.setdefault(gm, {})
        for node in list(gm.graph.nodes):
            ann = A.get_annotation(node)
            if ann is None or node.op != "call_function":
                continue
            for i, spec in ann.input_specs.items():
                arg = node.args[i] if i < len(node.args) else None
                if not (isinstance(spec, QuantSpec) and isinstance(arg, fx.Node) and _is_constant(arg)):
                    continue
                name = f"{self.prefix}_{len(table)}"
                where = f"weight of {node.name} ({module_path(node) or 'top'})"
                gm.add_submodule(name, make_fake_quant(spec, where, learn_scale=self.learn_scale,
                                                       weight=eval_constant(gm, arg)))
                with gm.graph.inserting_before(node):
                    call = gm.graph.call_module(name, (arg,))
                copy_meta(arg, call, keys=("val",))
                node.update_arg(i, call)
                table[name] = node.name
        return PassResult(gm, bool(table))


class MaterializeWeightFakeQuant(Pass):
    """Convert side: each weight fake-quant becomes the constant it sees, tagged with the fake-quant's
    parameters (refreshed from the current weight first, as an eval forward would); fixed-range
    fake-quants are removed (ConvertToReference inserts the fixed parameters)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        table = meta.WEIGHT_FAKE_QUANT.pop(gm, {})
        fixed = set(meta.FIXED_FAKE_QUANT.pop(gm, []))
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or (node.target not in table and node.target not in fixed):
                continue
            if node.target in fixed:
                node.replace_all_uses_with(node.args[0])
            else:
                fq: FakeQuantize = gm.get_submodule(node.target)
                with torch.no_grad():  # what an eval forward computes now (the observer refresh included)
                    value = fq(eval_constant(gm, node.args[0]))
                const = add_constant(gm, f"{table[node.target]}_weight", value, node)
                meta.WEIGHT_QPARAMS.set(const, fq.calculate_qparams())
                copy_meta(node, const, keys=("val",))
                node.replace_all_uses_with(const)
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
        gm.graph.eliminate_dead_code()
        return PassResult(gm, bool(table or fixed))
