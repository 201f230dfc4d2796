"""The one owner of quantization annotations on fx nodes (``node.meta[KEY]``).

Every other module calls :func:`get_annotation` / :func:`set_annotation`; nothing else reads the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import fx

from . import meta
from .specs import Spec

KEY = meta.ANNOTATION.name  # declared in qcompile.meta with every other key; only this module uses it
GROUP_KEY = meta.GROUP.name

# Status of a node in the coverage report.
INT8 = "int8"
WIDER_WEIGHTS = "weights kept at"  # starts the note of an int8 group whose weights WeightSpec.sensitive_bits widened
FLOAT_UNSUPPORTED = "float: unsupported by backend"
FLOAT_EXCLUDED = "float: excluded by user"
FLOAT_NOT_CAPTURED = "float: not captured"
FLOAT_RUNTIME = "float: fell back on the runtime"
FLOAT_OUTPUT = "float: model output"  # int8 inputs / weights, float compute so outputs are not rounded
# int8 inputs / weights, float compute and output where every consumer is float anyway (a backend's choice,
# e.g. the ExecuTorch backend's depthwise convs before hardswish: backends/executorch/depthwise.py)
FLOAT_FEEDS_FLOAT = "float: output feeds float ops"
PASSTHROUGH = "n/a"  # placeholders, parameters, outputs
# the float multiply-add (and pad) putting an image input's pixel lattice on the integers 0..255, so the
# first conv's int8 input is exact (passes/input_lattice.py): float by design, not a fallback
FLOAT_EXACT_INPUT = "float: exact 8-bit input"


@dataclass(frozen=True)
class Annotation:
    """Per-node quantization intent chosen by the backend.

    input_specs  argument index -> spec of that input edge (activation, weight, bias)
    output_spec  spec of the node's output, or None when the output stays float / inside a group
    status / reason  int8 or one of the float statuses, with the reason a user reads
    group        name of the fusion group this node belongs to (its anchor's name)
    pattern      name of the support-table entry that claimed the node
    """

    input_specs: dict = field(default_factory=dict)
    output_spec: Spec | None = None
    status: str = INT8
    reason: str = ""
    group: str | None = None
    pattern: str | None = None

    def with_(self, **kw) -> "Annotation":
        return replace(self, **kw)


def get_annotation(node: fx.Node) -> Annotation | None:
    return meta.ANNOTATION.get(node)


def set_annotation(node: fx.Node, ann: Annotation | None) -> None:
    if ann is None:
        meta.ANNOTATION.pop(node, None)
    else:
        meta.ANNOTATION.set(node, ann)


@dataclass(frozen=True)
class FusionGroup:
    """Nodes that run as one kernel: anchor first, output node last."""

    name: str
    pattern: str
    nodes: tuple[str, ...]

    @property
    def anchor(self) -> str:
        return self.nodes[0]

    @property
    def output(self) -> str:
        return self.nodes[-1]


def get_group(node: fx.Node) -> FusionGroup | None:
    return meta.GROUP.get(node)


def set_group(node: fx.Node, group: FusionGroup | None) -> None:
    if group is None:
        meta.GROUP.pop(node, None)
    else:
        meta.GROUP.set(node, group)
