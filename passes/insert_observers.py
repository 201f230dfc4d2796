"""Insert observers (PTQ) for every annotated activation value / edge.

Values whose specs are Shared with each other form equivalence classes (networkx connected
components) and share one observer module, so cat / max-pool / reshape keep their input's params.
Weights are not observed here: convert computes their parameters from the constant itself.
"""
from __future__ import annotations

from typing import Callable

import networkx as nx
from torch import fx

from qcompile import meta
from qcompile import annotation as A
from qcompile.ir import module_path
from qcompile.specs import FixedSpec, QuantSpec, SharedSpec

from .infra import Pass, PassResult

OBSERVED = meta.OBSERVED.name  # the key's string (older callers read gm.meta[OBSERVED]); code uses meta.OBSERVED


def value_classes(gm: fx.GraphModule) -> list[tuple[QuantSpec | FixedSpec, list[fx.Node]]]:
    """Equivalence classes of node outputs that share quantization parameters."""
    g = nx.Graph()
    by_name = {n.name: n for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        ann = A.get_annotation(node)
        if ann is None or ann.output_spec is None:
            continue
        g.add_node(node.name)
        if isinstance(ann.output_spec, SharedSpec):
            g.add_edge(node.name, ann.output_spec.node)
    classes = []
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    for comp in nx.connected_components(g):
        members = sorted(comp, key=order.__getitem__)
        specs = [A.get_annotation(by_name[m]).output_spec for m in members
                 if A.get_annotation(by_name[m]) is not None and A.get_annotation(by_name[m]).output_spec is not None]
        roots = [s for s in specs if not isinstance(s, SharedSpec)]
        if not roots:  # a shared op whose source has no output spec: the source edge is observed with ...
            src = by_name[members[0]]
            consumer_specs = [A.get_annotation(u).input_specs for u in src.users if A.get_annotation(u)]
            roots = [s for d in consumer_specs for s in d.values() if isinstance(s, QuantSpec)]
        classes.append((roots[0], [by_name[m] for m in members]))
    return classes


class InsertObservers(Pass):
    """``make_observer(spec) -> nn.Module`` builds each observer (fake-quant modules for QAT)."""
    requires, ensures = frozenset({"annotated"}), frozenset({"observed"})

    def __init__(self, make_observer: Callable, prefix: str = "observer"):
        self.make_observer, self.prefix = make_observer, prefix

    def _new(self, gm, spec, where: str) -> str:
        name = f"{self.prefix}_{len(meta.OBSERVED.setdefault(gm, {}))}"
        mod = self.make_observer(spec)
        if hasattr(mod, "name"):
            mod.name = where
        gm.add_submodule(name, mod)
        meta.OBSERVED.get(gm)[name] = []
        return name

    def _observe_value(self, gm, node: fx.Node, obs: str) -> fx.Node:
        with gm.graph.inserting_after(node):
            call = gm.graph.call_module(obs, (node,))
        node.replace_all_uses_with(call, delete_user_cb=lambda u: u is not call)
        call.meta.update({k: node.meta[k] for k in ("val", "tensor_meta", "nn_module_stack", "stack_trace") if k in node.meta})
        meta.OBSERVED.get(gm)[obs].append(node.name)
        return call

    def call(self, gm: fx.GraphModule) -> PassResult:
        observed: dict[str, fx.Node] = {}
        for spec, members in value_classes(gm):
            if isinstance(spec, FixedSpec):
                continue  # convert inserts fixed parameters directly
            obs = self._new(gm, spec, f"{members[0].name} ({module_path(members[0]) or 'top'})")
            for m in members:
                observed[m.name] = self._observe_value(gm, m, obs)
        self._observe_edges(gm, observed)
        return PassResult(gm, True)

    def _observe_edges(self, gm, observed: dict[str, fx.Node]) -> None:
        cache: dict[tuple, fx.Node] = {}
        for node in list(gm.graph.nodes):
            ann = A.get_annotation(node)
            if ann is None or node.op != "call_function":
                continue
            for i, spec in ann.input_specs.items():
                arg = node.args[i] if i < len(node.args) else None
                if not isinstance(spec, QuantSpec) or not isinstance(arg, fx.Node) or arg.op == "get_attr":
                    continue
                if spec.dynamic:
                    continue  # quantized at run time (e.g. executorch's dynamic output GEMM): nothing to observe
                if arg.op == "call_module" and arg.target in meta.OBSERVED.get(gm, {}):
                    continue  # already an observed value
                producer = A.get_annotation(arg)
                if producer is not None and isinstance(producer.output_spec, FixedSpec):
                    continue  # fixed parameters: convert quantizes it once
                key = (arg.name, spec)
                if key not in cache:
                    obs = self._new(gm, spec, f"input {i} of {node.name} ({module_path(node) or 'top'})")
                    with gm.graph.inserting_after(arg):
                        call = gm.graph.call_module(obs, (arg,))
                    call.meta.update({k: arg.meta[k] for k in ("val", "tensor_meta") if k in arg.meta})
                    meta.EDGE_OBSERVER.set(call, True)
                    meta.OBSERVED.get(gm)[obs].append(arg.name)
                    cache[key] = call
                node.update_arg(i, cache[key])
