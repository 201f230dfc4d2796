"""Lower the quantize/dequantize reference graph to PyTorch's quantized CPU kernels.

A group ``dequantize -> op(s) -> quantize`` that a rule claims becomes one kernel on quantized
tensors (``quantized::conv2d_relu`` ...). Quantized values flow between consecutive int8 kernels with
no quantize/dequantize, in channels-last layout. A group no rule claims stays float: its inputs are
dequantized, and the node is reported with the reason.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx

from qcompile.ir import copy_meta, get_attr_value
from qcompile.passes import rewrite
from qcompile.passes.rewrite import Match, Rule, RuleSet

aten, qops, qd = torch.ops.aten, torch.ops.quantized, torch.ops.quantized_decomposed
_Q = {qd.quantize_per_tensor.default}
_DQ = {qd.dequantize_per_tensor.default}
_DQ_W = {qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default}
_TORCH_DTYPE = {torch.uint8: torch.quint8, torch.int8: torch.qint8, torch.int32: torch.qint32}


@dataclass
class Value:
    node: fx.Node            # node in the new graph
    quantized: bool = False  # a torch quantized tensor (quint8)
    scale: float = 0.0
    zero_point: int = 0


@dataclass
class LowerResult:
    gm: fx.GraphModule
    kernels: dict = field(default_factory=dict)    # ref node name -> kernel name
    fallbacks: dict = field(default_factory=dict)  # ref node name -> reason it stayed float
    taps: dict = field(default_factory=dict)       # ref quantize node name -> lowered node name (same value)


def _qparams(q: fx.Node) -> tuple[float, int, torch.dtype]:
    return float(q.args[1]), int(q.args[2]), q.args[5]


def _int_weight(ref: fx.GraphModule, dq: fx.Node) -> torch.Tensor:
    """The quantized (qint8) weight tensor behind a weight dequantize node."""
    q = get_attr_value(ref, dq.args[0])
    if dq.target == qd.dequantize_per_tensor.default:
        return torch._make_per_tensor_quantized_tensor(q, float(dq.args[1]), int(dq.args[2]))
    scales = get_attr_value(ref, dq.args[1]).double()
    zps = get_attr_value(ref, dq.args[2]).long()
    return torch._make_per_channel_quantized_tensor(q, scales, zps, int(dq.args[3]))


def _dequantized_weight(ref, dq: fx.Node) -> torch.Tensor:
    return _int_weight(ref, dq).dequantize()


class Lowerer:
    """Build the lowered graph from the reference graph, one node (or group) at a time.

    ``patterns`` are the backend's fusion patterns: they decide the groups, largest first, exactly as
    fusion did before annotation; ``rules`` (a :class:`RuleSet`, e.g. ``rules.RULES``) say how the group
    of the same name lowers. Both go through the rewrite engine's one loop (``rewrite.run``)."""

    def __init__(self, ref: fx.GraphModule, patterns: RuleSet, rules: RuleSet, channels_last: bool = True,
                 exact_quantize: bool = False):
        self.ref, self.patterns, self.rules, self.channels_last = ref, patterns, rules, channels_last
        self.groups = RuleSet(Rule(p.name, p.pattern, p.check, p.score,
                                   rewrite=_group_rewrite(p.name, rules.get(p.name))) for p in patterns)
        self.exact_quantize = exact_quantize
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[str, Value] = {}
        self.float_cache: dict[str, fx.Node] = {}
        self.float_of: dict[str, fx.Node] = {}  # quantize node -> the float it quantized (full-range, native)
        self.done: set[str] = set()
        self.result = LowerResult(gm=None)
        self._n = 0

    # -- values ---------------------------------------------------------------------------------
    def constant(self, value, base: str) -> fx.Node:
        self._n += 1
        name = f"{base}_{self._n}"
        setattr(self.root, name, value)
        return self.graph.get_attr(name)

    def call(self, target, args, src: fx.Node | None = None) -> fx.Node:
        node = self.graph.call_function(target, tuple(args))
        if src is not None:
            copy_meta(src, node, keys=("nn_module_stack", "stack_trace"))
        return node

    def as_float(self, arg):
        """Map a reference-graph argument to a float value in the new graph."""
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.as_float(a) for a in arg)
        if not isinstance(arg, fx.Node):
            return arg
        if arg.target in _DQ and arg.args[0].name in self.env:  # float user of a quantized value
            arg = arg.args[0]
        if arg.name not in self.env:
            self.env[arg.name] = Value(self._lazy(arg))
        v = self.env[arg.name]
        if not v.quantized:
            return v.node
        if arg.name not in self.float_cache:
            self.float_cache[arg.name] = self.call(torch.Tensor.dequantize, (v.node,))
        return self.float_cache[arg.name]

    def _lazy(self, node: fx.Node) -> fx.Node:
        if node.op == "get_attr":
            return self.constant(get_attr_value(self.ref, node), "const")
        if node.target in _DQ_W and node.args[0].op == "get_attr":  # weight of a float op
            return self.constant(_dequantized_weight(self.ref, node), "weight")
        raise KeyError(f"value {node.name} used before it was lowered")

    def quantized_input(self, arg: fx.Node) -> Value | None:
        """The quantized value feeding a group through a dequantize node, or None."""
        if not (isinstance(arg, fx.Node) and arg.target in _DQ):
            return None
        q = arg.args[0]
        v = self.env.get(q.name)
        return v if v is not None and v.quantized else None

    def float_input(self, arg: fx.Node) -> fx.Node:
        """A float value that a kernel quantizing its input with the same parameters turns into exactly the
        quantized value behind ``arg`` (a dequantize node): the float it was quantized from, when a native
        full-range quantize made it (no dequantize pass), else its dequantized copy."""
        return self.float_of.get(arg.args[0].name) or self.as_float(arg)

    # -- nodes ----------------------------------------------------------------------------------
    def run(self) -> LowerResult:
        for step in rewrite.run(self.ref.graph.nodes, self.groups, self, skip=lambda n: n.name in self.done):
            if step.match is not None and self._claim(step):
                continue
            getattr(self, f"_op_{step.node.op}")(step.node)
        self.graph._codegen = copy.deepcopy(self.ref.graph._codegen)  # same call signature as the model
        self.graph.eliminate_dead_code()  # e.g. a quantize whose float source a float-output kernel took instead
        gm = fx.GraphModule(self.root, self.graph)
        self.result.gm = gm
        return self.result

    def _op_placeholder(self, node):
        new = self.graph.placeholder(node.name)
        copy_meta(node, new, keys=("val",))
        self.env[node.name] = Value(new)

    def _op_get_attr(self, node):
        pass  # materialized lazily, only if a float op uses it

    def _op_output(self, node):
        self.graph.output(self.as_float(node.args[0]))

    def _op_call_module(self, node):
        raise NotImplementedError(f"unexpected call_module {node.target} in a reference graph")

    def _op_call_function(self, node):
        if node.target in _Q:
            return self._quantize(node)
        if node.target in _DQ or node.target in _DQ_W:
            return  # consumed by groups, or dequantized lazily by float users
        self._float_op(node)

    def _quantize(self, q: fx.Node):
        scale, zp, dtype = _qparams(q)
        src = q.args[0]
        prev = self.env.get(src.name)
        if prev is not None and prev.quantized:  # already quantized by its kernel (fused output)
            self.env[q.name] = prev
            return
        x = self.as_float(src)
        if self.channels_last and _ndim(src) == 4 and _feeds_spatial_op(q):  # convert the float: cheaper
            # than the quint8 afterwards; only for convs / pools (attention scores stay row-major)
            x = self.call(torch.Tensor.contiguous, (x,))
            x.kwargs = {"memory_format": torch.channels_last}
        qmin, qmax = int(q.args[3]), int(q.args[4])
        full_range = dtype in _TORCH_DTYPE and (qmin, qmax) == (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
        if self.exact_quantize or not full_range:
            # the reference's own quantize op, then a zero-copy view as a quantized tensor: bit-exact
            # with the reference graph (it rounds x * (1 / scale)), five passes over the float tensor
            ints = self.call(qd.quantize_per_tensor.default, (x, *q.args[1:]), src)
            out = self.call(torch._make_per_tensor_quantized_tensor, (ints, scale, zp), src)
        else:
            # one native pass; it rounds x / scale, so a value on a rounding tie can land one step
            # away from the reference (7 of 602k values of an image batch)
            out = self.call(torch.quantize_per_tensor, (x, scale, zp, _TORCH_DTYPE[dtype]), src)
            self.float_of[q.name] = x
        self.env[q.name] = Value(out, True, scale, zp)
        self.result.taps[q.name] = out.name

    def _float_op(self, node: fx.Node):
        args = self.as_float(node.args)
        kwargs = {k: self.as_float(v) for k, v in node.kwargs.items()}
        new = self.graph.call_function(node.target, args, kwargs)
        copy_meta(node, new)
        self.env[node.name] = Value(new)
        self.result.fallbacks.setdefault(node.name, "no lowering rule matched this node")

    def _claim(self, step: rewrite.Step) -> bool:
        """Record a group's lowering (True) or, when its rule declined, the reason for each node (False)."""
        nodes = step.match.nodes
        if step.reason is not None:
            for n in nodes:
                self.result.fallbacks[n.name] = step.reason
            return False
        q, emitted = step.match.user, step.result
        for n in nodes:
            self.done.add(n.name)
            self.result.kernels[n.name] = emitted.kernel
        if not emitted.value.quantized:  # a float-output kernel: its consumers are float ops
            self.env[nodes[-1].name] = emitted.value
            return True
        self.done.add(q.name)
        self.env[q.name] = emitted.value
        self.result.taps[q.name] = emitted.value.node.name
        return True


def _group_rewrite(name: str, rule: Rule | None):
    """The rewrite of group ``name``: its lowering rule, once the group is known to end in one quantize."""
    def lower_group(m: Match):
        if rule is None or rule.rewrite is None:
            return f"no lowering rule for pattern {name}"
        if (m.user is None or m.user.target not in _Q) and not getattr(rule.rewrite, "float_output", False):
            return "group output is not quantized (no single quantize node after it)"
        return rule.rewrite(m)
    return lower_group


@dataclass
class Emitted:
    value: Value
    kernel: str


def _ndim(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else -1


_SPATIAL = ("conv2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d")


def _feeds_spatial_op(q: fx.Node) -> bool:
    """Whether a quantized 4-D value reaches a conv or pool (the kernels that want channels-last) through
    its dequantize nodes, possibly after int8 element-wise ops (add, relu) that keep the layout."""
    from qcompile.ops import op_kind
    seen, stack = set(), [q]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.name in seen:
                continue
            seen.add(u.name)
            kind = op_kind(u)
            if kind in _SPATIAL:
                return True
            if u.target in _DQ or u.target in _Q or kind in ("add", "relu", "relu6", "hardtanh", "mul", "hardswish"):
                stack.append(u)
    return False
