"""Lower the quantize/dequantize reference graph to an ExecuTorch program with XNNPACK delegation.

    reference graph (copy) ── tag nodes with their reference names; dequantize the weights of float-output
    │                         GEMMs; pick the container of low-bit weights (packed 4-bit or int8);
    │                         hardsigmoid -> hardtanh / div; one dequantize per consumer; drop unused
    │                         constants
        └─ torch.export (static shapes of the example inputs)      quantized_decomposed q/dq + ATen
            └─ to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()]), "why not" log captured
                └─ read back the delegation (delegation.py) ── kernels / fallbacks per reference node
                    └─ to_executorch() ── .pte buffer, loaded in executorch.runtime

The reference graph already is the form PT2E's ``convert_pt2e`` produces (int8 weight constants ->
dequantize_per_channel, activations quantize -> dequantize, float bias), which is what XNNPACK's
partitioner pattern-matches; lowering only re-exports it.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import fx

from qcompile import meta
from qcompile.errors import QCompileError
from qcompile.ir import add_constant, get_attr_value
from qcompile.passes.capture import CapturedInputs
from qcompile.ops import op_kind

from ..base import Lowered
from .delegation import TAG, Delegation, read_delegation
from .dynamic import group_containers, is_dynamic_input, per_channel_weights
from .proof import describe, mixed_dim_orders, model_frames, prove
from .rewrite import (clone_before_reshape_of_transposed, max_dim_for_xnnpack, requantize_cat_inputs,
                      requantize_float_pads, splits_as_slices)
from .runtime import PteProgram
from .support import GEMM_KINDS
from .verify import INT4_PACKED, weight_storage

qd, aten = torch.ops.quantized_decomposed, torch.ops.aten
_DQ_ACT = (qd.dequantize_per_tensor.default,)
_DQ_WEIGHT = (qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default)
_ACTS = (aten.relu.default, aten.hardtanh.default)


@dataclass(frozen=True)
class LowerOptions:
    duplicate_dequant: bool = True
    channels_last_inputs: bool = True


@dataclass
class ExecuTorchLowered(Lowered):
    """What ``ExecuTorchBackend.lower`` returns: the program and what the runtime does with each node
    (kernels: reference node -> "XNNPACK int8 convolution" ...; fallbacks: node meant int8 -> why not)."""

    program: PteProgram
    delegation: Delegation
    weights: dict = field(default_factory=dict)    # weight storage in the program (see weight_storage)
    containers: dict = field(default_factory=dict) # low-bit GEMM node -> how its weights are stored
    timings: dict = field(default_factory=dict)

    @property
    def pte_bytes(self) -> int:
        return len(self.program.buffer)


# -- rewriting the reference copy ---------------------------------------------------------------------
def tag_nodes(gm: fx.GraphModule) -> None:
    """Record each node's reference name in ``meta["custom"]``: torch.export and ExecuTorch's edge
    passes carry that dict onto every node derived from it (decompositions included)."""
    for node in gm.graph.nodes:
        if node.op == "call_function":
            meta.custom_set(node, TAG, node.name)


def duplicate_dequant(gm: fx.GraphModule) -> bool:
    """Give every consumer of an activation dequantize its own copy (PT2E's DuplicateDQPass)."""
    modified = False
    for dq in [n for n in gm.graph.nodes if n.target in _DQ_ACT and len(n.users) > 1]:
        for user in list(dq.users)[1:]:
            with gm.graph.inserting_before(user):
                twin = gm.graph.call_function(dq.target, dq.args, dict(dq.kwargs))
            twin.meta = copy.copy(dq.meta)
            user.replace_input_with(dq, twin)
            modified = True
    if modified:
        gm.recompile()
    return modified


def _quantized_output(node: fx.Node) -> bool:
    """node -> quantize, or node -> relu / hardtanh -> quantize: the output pattern of XNNPACK's int8 GEMMs."""
    users = list(node.users)
    if len(users) == 1 and users[0].target in _ACTS:
        users = list(users[0].users)
    return len(users) == 1 and users[0].target == qd.quantize_per_tensor.default


def float_output_weights(gm: fx.GraphModule) -> list[str]:
    """Dequantize, at export time, the int8 weights of conv / linear nodes whose output stays float.

    The reference computes such a node (a model output with ``quantize_outputs=False``) as
    ``op(dequantize(x), dequantize(w_int8))`` with a float result. XNNPACK has no int8-input /
    float-output static GEMM (its partitioner declines a quantized GEMM without an output quantize, and
    the node would fall to the portable kernels), so the weight becomes the float constant
    ``dequantize(w_int8)``: XNNPACK runs the same arithmetic in fp32, at the cost of fp32 weight storage.
    """
    done = []
    for node in list(gm.graph.nodes):
        w = node.args[1] if node.op == "call_function" and len(node.args) > 1 else None
        if not (isinstance(w, fx.Node) and w.target in _DQ_WEIGHT and w.args[0].op == "get_attr"):
            continue
        if _quantized_output(node) or is_dynamic_input(node.args[0]):
            continue  # int8 output, or a dynamic GEMM (int8 weights, float output: XNNPACK qd8 x qc8w)
        value = _run_node(gm, w)
        const = add_constant(gm, f"{node.name}_weight_fp32", value, node)
        node.replace_input_with(w, const)
        done.append(node.name)
    if done:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return done


def _weight_range(dq: fx.Node) -> tuple[int, int]:
    """(quant_min, quant_max) of a weight dequantize_per_tensor / dequantize_per_channel."""
    i = 4 if dq.target == qd.dequantize_per_channel.default else 3
    return int(dq.args[i]), int(dq.args[i + 1])


def weight_containers(gm: fx.GraphModule) -> dict[str, str]:
    """Choose how XNNPACK stores low-bit (4..7-bit) conv / linear weights; returns node -> container.

    XNNPACK's serializer reads the bit width from the weight dequantize's range: a per-channel int8
    dequantize with ``[quant_min, quant_max] == [-8, 7]`` becomes a ``qcint4`` tensor, two codes per byte,
    and every other range an int8 (qc8 / qs8) one.

    * linear, 4-bit, even number of input features: packed 4-bit. XNNPACK has a static qs8 x qc4w
      fully-connected kernel; a per-tensor weight is turned into per-channel with one repeated scale
      (same arithmetic) because qc4w exists per channel only. Odd input features are not packed:
      ExecuTorch 1.5.1's ``convert_to_qc4w`` pads each row to even length, which XNNPACK reads as the
      wrong rows (measured: outputs off by tens of steps).
    * everything else (conv, depthwise conv, 5..7-bit, odd linear): the codes stay in int8 and run in
      the int8 kernels exactly. XNNPACK has no static low-bit convolution, and ``convert_to_qc4w``
      rejects 4-D weights, so the range of a per-channel 4-bit conv dequantize is widened to the int8
      [-127, 127] for export (the range arguments are bounds, not arithmetic: the codes and the
      dequantized values do not change).
    """
    containers = {}
    for dq in [n for n in gm.graph.nodes if n.target in _DQ_WEIGHT and n.args and isinstance(n.args[0], fx.Node)
               and n.args[0].op == "get_attr" and n.args[-1] == torch.int8]:
        users = [u for u in dq.users if op_kind(u) in GEMM_KINDS and len(u.args) > 1 and u.args[1] is dq]
        if not users or len(users) != len(dq.users):
            continue
        qmin, qmax = _weight_range(dq)
        if qmax >= 127:
            continue  # 8-bit: qc8 / qs8 as always
        bits = (qmax + 1).bit_length()
        codes = get_attr_value(gm, dq.args[0])
        if (qmin, qmax) == (-8, 7) and codes.dim() == 2 and codes.shape[1] % 2 == 0 and \
                all(op_kind(u) == "linear" for u in users):
            if dq.target == qd.dequantize_per_tensor.default:
                _per_tensor_to_per_channel(gm, dq, codes.shape[0])
            form = INT4_PACKED
        else:
            if dq.target == qd.dequantize_per_channel.default and (qmin, qmax) == (-8, 7):
                dq.update_arg(4, -127)
                dq.update_arg(5, 127)
            if op_kind(users[0]) == "linear" and bits == 4:
                why = "an odd number of input features (ExecuTorch 1.5.1 mis-packs qc4w rows of odd length)"
            elif op_kind(users[0]) == "linear":
                why = f"XNNPACK has no {bits}-bit kernel"
            else:
                why = "XNNPACK has no static low-bit convolution kernel"
            form = f"{bits}-bit codes stored in int8: {why}"
        containers.update({u.name: form for u in users})
    if containers:
        gm.recompile()
    return containers


def _per_tensor_to_per_channel(gm: fx.GraphModule, dq: fx.Node, channels: int) -> None:
    """dequantize_per_tensor(w, s, 0, ...) -> dequantize_per_channel(w, [s] * channels, [0] * channels, 0, ...)."""
    codes, scale, zp, qmin, qmax, dtype = dq.args[:6]
    s = add_constant(gm, f"{dq.name}_scale", torch.full((channels,), float(scale), dtype=torch.float32), dq)
    z = add_constant(gm, f"{dq.name}_zp", torch.full((channels,), int(zp), dtype=torch.int64), dq)
    with gm.graph.inserting_before(dq):
        new = gm.graph.call_function(qd.dequantize_per_channel.default, (codes, s, z, 0, qmin, qmax, dtype))
    new.meta = copy.copy(dq.meta)
    dq.replace_all_uses_with(new)
    gm.graph.erase_node(dq)


def decompose_hardsigmoid(gm: fx.GraphModule) -> bool:
    """hardsigmoid(x) -> hardtanh(x + 3, 0, 6) / 6, PyTorch's own formula (bit-identical). ExecuTorch's
    decomposition introduces int64 constants cast to float on the portable kernels at every call;
    with float scalars the three ops stay inside the XNNPACK delegate (fp32)."""
    nodes = [n for n in gm.graph.nodes if n.target == aten.hardsigmoid.default]
    for node in nodes:
        with gm.graph.inserting_before(node):
            add = gm.graph.call_function(aten.add.Tensor, (node.args[0], 3.0))
            clamp = gm.graph.call_function(aten.hardtanh.default, (add, 0.0, 6.0))
            div = gm.graph.call_function(aten.div.Tensor, (clamp, 6.0))
        for new in (add, clamp, div):
            new.meta.update({k: v for k, v in node.meta.items() if k in ("custom", "nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(div)
        gm.graph.erase_node(node)
    if nodes:
        gm.recompile()
    return bool(nodes)


def channels_last_inputs(gm: fx.GraphModule) -> list[str]:
    """Transpose 4-D float inputs to channels-last before their quantize, not after.

    XNNPACK computes in NHWC. Left alone, ExecuTorch's channels-last pass transposes a graph input
    after its quantize, as int8 (XNNPACK's x8 transpose); done first, in fp32, the same transpose
    runs on XNNPACK's faster x32 kernels (MobileNetV2 224 x 224 input: 54 us against 90 us) and the
    quantize works on NHWC data. Values are unchanged (a copy in another memory format)."""
    done = []
    for ph in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        val = ph.meta.get("val")
        users = list(ph.users)
        if not (isinstance(val, torch.Tensor) and val.dim() == 4 and val.is_floating_point() and users
                and val.shape[1] > 1 and val.shape[2] * val.shape[3] > 1  # else NCHW already is NHWC
                and all(u.target == qd.quantize_per_tensor.default for u in users)):
            continue
        with gm.graph.inserting_after(ph):
            nhwc = gm.graph.call_function(aten._to_copy.default, (ph,), {"memory_format": torch.channels_last})
        nhwc.meta["val"] = val
        for u in users:
            u.replace_input_with(ph, nhwc)
        done.append(ph.name)
    if done:
        gm.recompile()
    return done


def global_pool_as_mean(gm: fx.GraphModule) -> bool:
    """adaptive_avg_pool2d(x, 1) -> mean(x, [-1, -2], keepdim=True): the same values, and the form
    XNNPACK's partitioner claims whatever the memory format (for a channels-last input, the edge
    dialect decomposes adaptive_avg_pool2d through as_strided_copy, which XNNPACK declines)."""
    nodes = [n for n in gm.graph.nodes if n.target == aten.adaptive_avg_pool2d.default
             and list(n.args[1]) in ([1, 1], [1]) and getattr(n.args[0].meta.get("val"), "dim", lambda: 0)() == 4]
    for node in nodes:
        with gm.graph.inserting_before(node):
            mean = gm.graph.call_function(aten.mean.dim, (node.args[0], [-1, -2], True))
        mean.meta = copy.copy(node.meta)
        node.replace_all_uses_with(mean)
        gm.graph.erase_node(node)
    if nodes:
        gm.recompile()
    return bool(nodes)


def _run_node(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    args = [get_attr_value(gm, a) if isinstance(a, fx.Node) else a for a in node.args]
    return node.target(*args).detach()


def drop_unused_constants(gm: fx.GraphModule) -> None:
    """Delete parameters / buffers no get_attr node reads (e.g. the float weights batch-norm folding
    replaced): torch.export would lift them and ExecuTorch would store them in the program."""
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]:
        gm.graph.erase_node(node)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            delattr(mod, leaf)
    gm.recompile()


def prepare_reference(reference: fx.GraphModule, opts: LowerOptions) -> tuple[fx.GraphModule, list[str], dict]:
    """A rewritten copy of the reference graph, the nodes whose weights were dequantized, and the
    containers of low-bit weights (``weight_containers``)."""
    gm = copy.deepcopy(reference)
    tag_nodes(gm)
    per_channel_weights(gm, _per_tensor_to_per_channel)
    float_weights = float_output_weights(gm)
    containers = {**weight_containers(gm), **group_containers(gm)}
    decompose_hardsigmoid(gm)
    splits_as_slices(gm)
    clone_before_reshape_of_transposed(gm)
    requantize_cat_inputs(gm)
    requantize_float_pads(gm)
    max_dim_for_xnnpack(gm)
    if opts.channels_last_inputs and channels_last_inputs(gm):
        global_pool_as_mean(gm)
    if opts.duplicate_dequant:
        duplicate_dequant(gm)
    drop_unused_constants(gm)
    return gm, float_weights, containers


def export_static(gm: fx.GraphModule, inputs: CapturedInputs) -> torch.export.ExportedProgram:
    """Export at the example inputs' shapes: XNNPACK delegates static reshapes only."""
    try:
        return torch.export.export(gm, tuple(inputs.args), dict(inputs.kwargs) or None, strict=False)
    except Exception as e:  # noqa: BLE001 - translated into an actionable error
        raise QCompileError(f"executorch backend: torch.export could not re-export the reference graph: "
                            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}\n"
                            f"  fix: report this graph (art.reference.print_readable()) or exclude the module "
                            f"named in the error") from e


# -- XNNPACK's "why not" log ----------------------------------------------------------------------
class _WhyNotHandler(logging.Handler):
    """Collects XNNPACK partitioner rejections (``WhyNoPartition`` log records), keyed by reference node."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.reasons: dict[str, list[str]] = {}

    def emit(self, record):
        why = record.msg
        node, reason = getattr(why, "node", None), getattr(why, "reason", None)
        if node is None or reason is None:
            return
        ref = meta.custom_get(node, TAG, getattr(node, "name", "?"))
        target = getattr(getattr(node, "target", None), "__name__", str(getattr(node, "target", "")))
        text = f"{target}: {reason}"
        bucket = self.reasons.setdefault(ref, [])
        if text not in bucket:
            bucket.append(text)


@contextmanager
def capture_why_not(logger_name: str = "executorch.backends.xnnpack"):
    logger = logging.getLogger(logger_name)
    handler = _WhyNotHandler()
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # keep XNNPACK's debug chatter out of the user's log
    try:
        yield handler.reasons
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


# -- the pipeline ------------------------------------------------------------------------------------
def to_edge_xnnpack(export):
    """``to_edge_transform_and_lower(export(), XNNPACK)``; ``export()`` is called again for the op-by-op retry
    (the first attempt may have changed the program it lowered)."""
    import executorch.kernels.quantized  # noqa: F401  out-variants of q/dq ops left outside the delegate
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    ep = export()
    with capture_why_not() as reasons:
        try:
            try:
                edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
            except AssertionError as e:
                if "dependency cycles" not in str(e):
                    raise
                # ExecuTorch 1.5.1 can group XNNPACK nodes into a partition that both feeds and reads a node
                # left outside it (Qwen3 / CodeGen, dynamic mode). Op by op the same nodes are delegated,
                # each in its own call: slower, but the program is valid.
                edge = to_edge_transform_and_lower(export(), partitioner=[XnnpackPartitioner(per_op_mode=True)])
        except Exception as e:  # noqa: BLE001 - translated into an actionable error
            outside = _non_core_nodes(ep, e)
            if outside:
                raise QCompileError(
                    f"executorch backend: ExecuTorch cannot run {outside[0].target} (not a core ATen op: the edge "
                    f"program rejects it, and ExecuTorch has no kernel for it, in int8 or float)\n"
                    + "".join(f"  node: {describe(n)}\n" for n in outside[:3])
                    + "  fix: compile for another backend (backend='x86' or 'onnx'), or express that code with "
                      "core ops; exclude= cannot help, the op has no float kernel either") from e
            raise QCompileError(f"executorch backend: to_edge_transform_and_lower failed: {type(e).__name__}: "
                                f"{model_frames(e)}\n  fix: exclude the module named above (exclude=[...]) so it "
                                f"stays float, or compile for another backend (backend='x86' or 'onnx')") from e
    return edge, reasons


def _non_core_nodes(ep: torch.export.ExportedProgram, error: Exception) -> list:
    """The nodes of ``ep`` running the op the edge verifier rejected as outside the core ATen opset."""
    m = re.search(r"Operator (\S+) is not in Core ATen opset", str(error))
    if not m:
        return []
    name = m.group(1).replace("torch._ops.", "")
    found = [n for n in ep.graph.nodes if n.op == "call_function" and str(n.target) == name]
    if not found:  # the op came from a decomposition (fft_fftn -> _fft_c2c): look where to_edge looked
        try:
            decomposed = ep.run_decompositions()
        except Exception:  # noqa: BLE001 - the op is still named, without its nodes
            return []
        found = [n for n in decomposed.graph.nodes if n.op == "call_function" and str(n.target) == name]
    return found


def _lower_once(reference: fx.GraphModule, inputs: CapturedInputs, opts: LowerOptions):
    gm, float_weights, containers = prepare_reference(reference, opts)
    edge, reasons = to_edge_xnnpack(lambda: export_static(gm, inputs))
    return gm, float_weights, containers, edge, reasons


def lower_reference(reference: fx.GraphModule, inputs: CapturedInputs, opts: LowerOptions,
                    run_check: bool = True) -> ExecuTorchLowered:
    """Lower, then load the program in ExecuTorch's runtime and run it once on the example inputs
    (``run_check``; loading always): a program that compiles but cannot load or run raises here."""
    t0 = time.perf_counter()
    gm, float_weights, containers, edge, reasons = _lower_once(reference, inputs, opts)
    if opts.channels_last_inputs and mixed_dim_orders(edge.exported_program().graph_module):
        # channels-last tensors would reach ExecuTorch's portable kernels, which reject mixed dim orders
        gm, float_weights, containers, edge, reasons = _lower_once(
            reference, inputs, dataclasses.replace(opts, channels_last_inputs=False))
    t2 = time.perf_counter()
    edge_gm = edge.exported_program().graph_module
    delegation = read_delegation(edge_gm, reasons)
    kernels, fallbacks = delegation.kernels_and_fallbacks(reference)
    for name in float_weights:
        if name in kernels:
            kernels[name] += " (fp32 weights: float output)"
    for name, form in containers.items():
        if name in kernels:
            kernels[name] += " (4-bit weights packed two per byte: XNNPACK qc4w)" if form == INT4_PACKED else f" ({form})"
    program = PteProgram.from_edge(edge, inputs)
    t3 = time.perf_counter()
    prove(program, [tuple(inputs.args), dict(inputs.kwargs)], edge_gm, reference, run=run_check)
    return ExecuTorchLowered(program, delegation, weight_storage(gm, containers), containers,
                             {"export_and_lower_s": t2 - t0, "to_executorch_s": t3 - t2,
                              "load_and_run_s": time.perf_counter() - t3}, kernels=kernels, fallbacks=fallbacks)
