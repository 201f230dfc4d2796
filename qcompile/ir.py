"""fx helpers shared by passes and backends, and the one fx -> networkx view."""
from __future__ import annotations

import itertools

import networkx as nx
import torch
from torch import fx


def get_attr_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor a get_attr node refers to."""
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def is_depthwise_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ``conv1d`` / ``conv2d`` with more than one group and one input channel per group (constant weight)."""
    if node.op != "call_function" or node.target not in (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default):
        return False
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    w = node.args[1]
    if int(groups) <= 1 or not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return False
    return get_attr_value(gm, w).shape[1] == 1


def constant_pad_value(node: fx.Node) -> float | None:
    """The fill value of a constant pad (``constant_pad_nd``, ``pad(mode="constant")``), else None."""
    if getattr(node, "op", None) != "call_function":
        return None
    if node.target == torch.ops.aten.constant_pad_nd.default:
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0.0)
    elif node.target == torch.ops.aten.pad.default:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        if mode != "constant":
            return None
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    else:
        return None
    return 0.0 if value is None else float(value)


def is_param(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def add_constant(gm: fx.GraphModule, base: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register ``value`` as a buffer of ``gm`` under a fresh name; return a get_attr node before ``before``."""
    base = base.replace(".", "_")
    for i in itertools.count():
        name = f"{base}_{i}" if i else base
        if not hasattr(gm, name):
            break
    gm.register_buffer(name, value.detach().clone())
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def replace_weight_bias(gm: fx.GraphModule, gemm: fx.Node, weight: torch.Tensor, bias: torch.Tensor,
                        tag: str) -> None:
    """Point a conv / linear node at new weight and bias constants (``<node>_weight_<tag>``,
    ``<node>_bias_<tag>``), appending the bias argument if the node had none."""
    args = list(gemm.args)
    args[1] = add_constant(gm, f"{gemm.name}_weight_{tag}", weight, gemm)
    bnode = add_constant(gm, f"{gemm.name}_bias_{tag}", bias, gemm)
    if len(args) > 2:
        args[2] = bnode
    else:
        args.append(bnode)
    gemm.args = tuple(args)


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def module_type(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][1]


def copy_meta(src: fx.Node, dst: fx.Node, keys=("nn_module_stack", "stack_trace", "val", "tensor_meta")) -> None:
    for k in keys:
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def erase_dead_params(gm: fx.GraphModule) -> None:
    """Erase unused get_attr nodes and dead code, then the parameters and buffers no get_attr node
    reads any more (e.g. float weights replaced by their integer form), so sizes and saved files only
    count what the graph computes with. Submodules the graph calls keep their state."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(f"{n.target}." for n in gm.graph.nodes if n.op == "call_module")
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in used or name.startswith(called):
            continue
        owner, _, attr = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if hasattr(mod, attr):
            delattr(mod, attr)
    gm.delete_all_unused_submodules()


def fill_fake_val(node: fx.Node, gm: fx.GraphModule | None = None) -> None:
    """Set ``node.meta['val']`` of an inserted call_function node by running its target on its arguments'
    fake values (later passes read shapes from it). With ``gm``, a get_attr argument contributes its real
    tensor, converted to the graph's fake mode. Left unset when no argument carries a fake value."""
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in node.args]
    if gm is not None:
        vals = [get_attr_value(gm, a) if isinstance(a, fx.Node) and a.op == "get_attr" else v
                for a, v in zip(node.args, vals)]
    mode = next((v.fake_mode for v in vals if hasattr(v, "fake_mode")), None)
    if mode is None:
        return
    with mode:
        vals = [mode.from_tensor(v) if isinstance(v, torch.Tensor) and not hasattr(v, "fake_mode") else v
                for v in vals]
        node.meta["val"] = node.target(*vals)


def plain_signature(gm: fx.GraphModule) -> bool:
    """Give ``gm`` a plain generated ``forward`` (no pytree flatten / unflatten around it) when that changes
    nothing a caller sees: positional tensor inputs named as in the model, no keyword inputs, and one tensor or
    a flat tuple of tensors out. True when it did. The flatten costs ~40 us per call with cold caches (after a
    weight-streaming call), which a batch-1 weight-only model pays on every call."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None or info.out_spec is None:
        return False
    ins, out_spec = info.in_spec, info.out_spec
    if ins.type is not tuple or ins.num_children != 2:
        return False
    args_spec, kwargs_spec = ins.children()
    if kwargs_spec.type is not dict or kwargs_spec.num_children or args_spec.type not in (tuple, list) \
            or not all(c.is_leaf() for c in args_spec.children()):
        return False
    if [n.target for n in gm.graph.nodes if n.op == "placeholder"] != list(info.orig_args):
        return False
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat = output.args[0]
    if not isinstance(flat, (tuple, list)):
        return False
    if out_spec.is_leaf() and len(flat) == 1:
        value = flat[0]
    elif out_spec.type is tuple and all(c.is_leaf() for c in out_spec.children()) and len(flat) == out_spec.num_children:
        value = tuple(flat)
    else:
        return False
    gm.graph.set_codegen(fx.graph.CodeGen())
    output.args = (value,)
    gm.recompile()
    return True


def record_values(gm: fx.GraphModule, flat_args, names) -> dict:
    """Run ``gm`` on ``flat_args`` (no grad) and return ``{node name: value}`` for the nodes in ``names``."""
    wanted, seen = set(names), {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted:
                seen[n.name] = out
            return out

    with torch.no_grad():
        _Recorder(gm).run(*flat_args)
    return seen


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """Directed graph of node names (edges producer -> consumer) with the fx node as attribute."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, node=node)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def tensor_numel(node: fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return int(val.numel())
        except Exception:  # symbolic shapes
            return int(torch.Size([s if isinstance(s, int) else 1 for s in val.shape]).numel())
    return 0


def concrete_shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(int(s) if isinstance(s, int) else int(s.node.hint) if hasattr(s, "node") and s.node.hint is not None else 1
                 for s in val.shape)


def output_steps(ref: fx.GraphModule) -> list:
    """The quantization step of each graph output that comes straight from a dequantize node (else None)."""
    out = next(n for n in ref.graph.nodes if n.op == "output")
    leaves, _ = torch.utils._pytree.tree_flatten(out.args[0])
    qd = torch.ops.quantized_decomposed
    return [float(leaf.args[1]) if isinstance(leaf, fx.Node) and leaf.target == qd.dequantize_per_tensor.default
            else None for leaf in leaves]
