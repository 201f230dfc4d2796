"""Layer-by-layer parity: every int8 tensor the runtime computes, checked against the reference graph
fed with the runtime's own inputs to that layer ("teacher forcing").

End to end, a deep quantized network amplifies rare one-step rounding differences (XNNPACK rounds the
bias to int32 and requantizes in fixed point; the reference computes in float): ExecuTorch's own PT2E
flow agrees with its reference within one step on ~75% of ResNet-18's outputs. Comparing each layer
given identical int8 inputs separates "the runtime implements the reference" from "errors compound".

How: a verification program is lowered from the same rewritten reference copy with one extra output per
activation quantize node (a dequantize of it: XNNPACK writes the int8 tensor out, exactly). An
``fx.Interpreter`` then runs the reference graph, and at each quantize node compares its value with the
runtime's and continues with the runtime's value. The shipped .pte is not changed; ``check`` asserts
the verification program's model outputs equal the shipped program's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from torch.utils import _pytree as pytree

from qcompile.ir import output_steps
from qcompile.passes.capture import CapturedInputs

qd = torch.ops.quantized_decomposed
_Q = qd.quantize_per_tensor.default


@dataclass
class LayerStats:
    name: str         # reference quantize node
    producer: str     # the reference node whose output it quantizes
    values: int
    exact: float
    within_one: float
    max_steps: float


@dataclass
class TapReport:
    layers: list = field(default_factory=list)
    outputs_within_one: float = 1.0   # model outputs, each layer's inputs forced to the runtime's
    consistent: bool = True           # verification program == shipped program on the model outputs

    def summary(self) -> dict:
        n = sum(s.values for s in self.layers)
        within = sum(s.within_one * s.values for s in self.layers) / n if n else 1.0
        worst = min(self.layers, key=lambda s: s.within_one, default=None)
        return {"layer_values_within_one_step": round(within, 6),
                "layer_exact_share": round(sum(s.exact * s.values for s in self.layers) / n, 6) if n else 1.0,
                "worst_layer": f"{worst.producer} ({worst.within_one:.4f})" if worst else "",
                "layer_max_error_in_steps": max((s.max_steps for s in self.layers), default=0.0),
                "forced_outputs_within_one_step": round(self.outputs_within_one, 6),
                "taps_consistent": self.consistent, "tapped_layers": len(self.layers)}


def add_taps(gm: fx.GraphModule) -> list[str]:
    """Make ``gm`` return (flat model outputs..., dequantize(q) for each activation quantize q); plain
    positional signature. Returns the tapped quantize node names in output order."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    model_outs = pytree.tree_leaves(out.args[0])
    taps = []
    for q in [n for n in gm.graph.nodes if n.target == _Q]:
        with gm.graph.inserting_after(q):
            dq = gm.graph.call_function(qd.dequantize_per_tensor.default, (q, *q.args[1:]))
        dq.meta.update({k: v for k, v in q.meta.items() if k in ("custom", "nn_module_stack", "stack_trace")})
        taps.append((q.name, dq))
    gm.graph._codegen = fx.graph.CodeGen()
    out.args = (tuple(model_outs) + tuple(dq for _, dq in taps),)
    gm.recompile()
    return [name for name, _ in taps]


class _Forced(fx.Interpreter):
    """Run the reference; at each tapped quantize node, record the mismatch and use the runtime's value."""

    def __init__(self, gm, tapped: dict):
        super().__init__(gm)
        self.tapped, self.stats = tapped, []

    def run_node(self, n):
        val = super().run_node(n)
        if n.target != _Q or n.name not in self.tapped:
            return val
        scale, zp, qmin, qmax, dtype = n.args[1:6]
        got = torch.clamp(torch.round(self.tapped[n.name] / scale) + zp, qmin, qmax).to(dtype)
        d = (val.float() - got.float()).abs()
        self.stats.append(LayerStats(n.name, n.args[0].name, d.numel(), (d == 0).float().mean().item(),
                                     (d <= 1).float().mean().item(), d.max().item() if d.numel() else 0.0))
        return got


def forced_run(reference: fx.GraphModule, inputs: CapturedInputs, tap_names: list, runtime_outs: list):
    n_model = len(runtime_outs) - len(tap_names)
    tapped = dict(zip(tap_names, runtime_outs[n_model:]))
    interp = _Forced(reference, tapped)
    flat = pytree.tree_leaves((tuple(inputs.args), dict(inputs.kwargs)))
    with torch.no_grad():
        ref_outs = pytree.tree_leaves(interp.run(*flat))
    return interp.stats, ref_outs, runtime_outs[:n_model]


def within_one_output_step(reference, ref_outs, run_outs) -> float:
    steps, shares = output_steps(reference), []
    for i, (r, l) in enumerate(zip(ref_outs, run_outs)):
        r, l = r.float(), l.float()
        step = steps[i] if i < len(steps) and steps[i] else max((r.max() - r.min()).item() / 255, 1e-12)
        shares.append(((r - l).abs() <= step * 1.001 + 1e-6).float().mean().item())
    return min(shares, default=1.0)


def layer_parity(artifact) -> TapReport:
    """Lower a tapped twin of the artifact's program, run it once on the example inputs, compare."""
    from .lower import export_static, prepare_reference, to_edge_xnnpack
    from .runtime import PteProgram
    inputs = artifact.example_inputs
    gm, _, _ = prepare_reference(artifact.reference, artifact.backend.lower_options())
    names = add_taps(gm)
    flat_inputs = CapturedInputs(tuple(pytree.tree_leaves((tuple(inputs.args), dict(inputs.kwargs)))), {})
    edge, _ = to_edge_xnnpack(lambda: export_static(gm, flat_inputs))
    program = PteProgram.from_edge(edge, flat_inputs)
    outs = pytree.tree_leaves(program.run(flat_inputs.args, {}))
    stats, ref_outs, run_outs = forced_run(artifact.reference, inputs, names, outs)
    shipped = pytree.tree_leaves(artifact(*inputs.args, **inputs.kwargs))
    consistent = all(torch.equal(a, b) for a, b in zip(shipped, run_outs))
    return TapReport(stats, within_one_output_step(artifact.reference, ref_outs, run_outs), consistent)
