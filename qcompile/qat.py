"""Quantization-aware training: prepare a fake-quantized training graph, train it, convert it.

    qat = qcompile.prepare_qat(model, example_inputs, backend="x86", weights=qcompile.WeightSpec(bits=4))
    opt = torch.optim.SGD(qat.parameters(), lr=1e-3)
    for x, y in loader:
        loss = F.cross_entropy(qat(x), y); opt.zero_grad(); loss.backward(); opt.step()
    art = qcompile.convert(qat)

The model is captured in training mode (torch.export's training IR keeps ``aten.batch_norm`` and
``aten.dropout`` as single nodes with their mode flag), run through the backend's own prepare passes with
FoldBatchNorm replaced by the conv-BN QAT collapse, so the annotation is exactly the one PTQ would make.
Fake-quant modules then sit where PTQ would put observers, plus one per weight; the conv-BN pairs are
re-expanded into the scaled-weight formulation (``passes/qat_conv_bn.py``). ``train()`` / ``eval()`` flip
the dropout / batch-norm flags in the one captured graph (no second capture to keep in sync).
Convert folds batch-norm on a copy, swaps fake-quants for the reference graph's quantize / dequantize
pairs and weight constants (with the fake-quants' own parameters) and lowers through the same backend code
as PTQ.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import torch
from torch import fx, nn

from . import pipeline
from .artifact import Artifact
from .errors import CalibrationError, ConfigError
from .fake_quant import FakeQuantize
from .passes.convert import ConvertToReference
from .passes.fold_batch_norm import FoldBatchNorm
from .passes.infra import FunctionPass, PassManager
from .passes.insert_fake_quant import (FIXED_FQ, InsertActivationFakeQuant, InsertWeightFakeQuant,
                                       MaterializeWeightFakeQuant, fake_quants)
from .passes.normalize import Normalize
from .passes.qat_conv_bn import (BN_COUNTERS, CollapseConvBn, DetachDropout, ExpandConvBn, FoldConvBn,
                                 ReattachDropout, StripBnCounters, remove_dropout, set_train_flags)

__all__ = ["prepare_qat", "QATModel", "convert_qat"]


class QATModel(nn.Module):
    """The fake-quantized training model returned by :func:`prepare_qat`.

    Train it like the original model (``parameters()``, ``train()`` / ``eval()``, ``state_dict()`` /
    ``load_state_dict()`` to save and resume), then ``qcompile.convert(qat)``. Controls:
    ``freeze_observers()`` (stop moving ranges), ``freeze_bn_stats()`` (batch-norm uses and keeps its
    running statistics), ``disable_fake_quant()`` / ``enable_fake_quant()``, ``freeze()`` (ranges and
    learned scales), ``calibrate(samples)`` (observe ranges with no training step)."""

    def __init__(self, gm: fx.GraphModule, ctx):
        super().__init__()
        for name in ("train", "eval"):  # torch.export's module() blocks these; this wrapper switches the graph
            gm.__dict__.pop(name, None)
        self.gm, self._ctx = gm, ctx
        self._counters = list(gm.meta.get(BN_COUNTERS, []))
        self.register_buffer("bn_frozen", torch.zeros(1, dtype=torch.uint8))
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync_graph())
        self.train(True)

    def forward(self, *args, **kwargs):
        if self.training and not bool(self.bn_frozen[0]):
            with torch.no_grad():
                for target in self._counters:
                    self.gm.get_buffer(target).add_(1)
        return self.gm(*args, **kwargs)

    # -- modes ----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "QATModel":
        super().train(mode)
        self._sync_graph()
        return self

    def _sync_graph(self) -> None:
        if set_train_flags(self.gm, dropout=self.training, batch_norm=self.training and not bool(self.bn_frozen[0])):
            self.gm.recompile()

    def freeze_bn_stats(self, frozen: bool = True) -> "QATModel":
        """Batch-norm normalises with (and stops updating) its running statistics, also in training."""
        self.bn_frozen[0] = int(frozen)
        self._sync_graph()
        return self

    # -- fake-quant controls --------------------------------------------------------------------
    def fake_quants(self) -> dict[str, FakeQuantize]:
        return fake_quants(self.gm)

    def _trainable_fake_quants(self) -> list[FakeQuantize]:
        fixed = set(self.gm.meta.get(FIXED_FQ, ()))  # fixed-range fake-quants never observe
        return [fq for name, fq in self.fake_quants().items() if name not in fixed]

    def enable_observers(self, enabled: bool = True) -> "QATModel":
        for fq in self._trainable_fake_quants():
            fq.enable_observer(enabled)
        return self

    def freeze_observers(self) -> "QATModel":
        return self.enable_observers(False)

    def enable_fake_quant(self, enabled: bool = True) -> "QATModel":
        for fq in self.fake_quants().values():
            fq.enable_fake_quant(enabled)
        return self

    def disable_fake_quant(self) -> "QATModel":
        return self.enable_fake_quant(False)

    def freeze(self, frozen: bool = True) -> "QATModel":
        """Freeze (or unfreeze) every range and learned scale (the last epochs, with freeze_bn_stats)."""
        for fq in self._trainable_fake_quants():
            fq.freeze(frozen)
        return self

    @torch.no_grad()
    def calibrate(self, data) -> "QATModel":
        """Observe activation ranges on ``data`` (tensors or tuples of inputs) without changing batch-norm
        statistics or applying dropout: a warm start before training, or before evaluating untrained."""
        was_training = self.training
        self.eval()
        for fq in self.fake_quants().values():
            fq.train()
        seen = 0
        for sample in data:
            args = sample if isinstance(sample, (tuple, list)) else (sample,)
            self.gm(*args)
            seen += 1
        if seen == 0:
            raise CalibrationError("calibrate() got no samples")
        return self.train(was_training)


def _qat_passes(learn_scale: bool):
    """(backend prepare passes -> QAT prepare passes, the fake-quant passes): batch-norm folding becomes the
    conv-BN collapse; dropout / BN counters are set aside while the backend's passes run."""
    def prepare(backend_passes: list) -> list:
        return [StripBnCounters(), DetachDropout()] + [CollapseConvBn() if isinstance(p, FoldBatchNorm) else p
                                                       for p in backend_passes]
    fake_quant = [InsertActivationFakeQuant(learn_scale), ExpandConvBn(), InsertWeightFakeQuant(learn_scale),
                  ReattachDropout()]
    return prepare, fake_quant


def prepare_qat(model: nn.Module, example_inputs, backend="x86", *, learn_scale: bool = False,
                **options) -> QATModel:
    """Capture ``model`` in training mode and insert fake-quantization for ``backend``.

    learn_scale: LSQ (learned scales, initialised from the first batch / the weights).
    Other options as :func:`qcompile.prepare` (config, weights, activations, exclude, strict, allow_float,
    example_kwargs, backend_options, quantize_outputs, passes). The user's model is not touched."""
    opts = pipeline.Options.parse({**options, "mode": options.get("mode", "qat")})
    if opts.mode != "qat":
        raise ConfigError(f"prepare_qat() is mode='qat'; got mode={opts.mode!r} (use qcompile.prepare for PTQ)")
    prepare, fake_quant = _qat_passes(learn_scale)
    gm, ctx = pipeline.setup(model, example_inputs, backend, opts, prepare_passes=prepare)
    t2 = time.perf_counter()
    fq = PassManager(fake_quant)
    gm = fq(gm).graph_module
    ctx.pass_log.extend(fq.log)
    ctx.timings["insert_fake_quant_s"] = time.perf_counter() - t2
    return QATModel(gm, ctx)


def _eval_copy(qat: QATModel) -> fx.GraphModule:
    gm = copy.deepcopy(qat.gm)
    gm.eval()
    set_train_flags(gm, dropout=False, batch_norm=False)
    gm.recompile()
    return gm


def float_model(qat: QATModel) -> fx.GraphModule:
    """The trained model in float: an eval-mode copy without its fake-quant modules."""
    gm = _eval_copy(qat)
    names = set(fake_quants(gm))
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in names:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for name in names:
        gm.delete_submodule(name)
    gm.recompile()
    return gm


def drop_unreferenced_tensors(gm: fx.GraphModule) -> bool:
    """Delete parameters / buffers no get_attr node reads (the raw weights and BN statistics once folded)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dead = [name for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()) if name not in used]
    for name in dead:
        owner, _, leaf = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        mod._parameters.pop(leaf, None)
        mod._buffers.pop(leaf, None)
    return bool(dead)


def reference_graph(qat: QATModel) -> tuple[fx.GraphModule, list]:
    """The quantize / dequantize reference graph of the QAT model's current state (and the pass log)."""
    pm = PassManager([FunctionPass(remove_dropout), FoldConvBn(), Normalize(), MaterializeWeightFakeQuant(),
                      ConvertToReference(), FunctionPass(drop_unreferenced_tensors)])
    return pm(_eval_copy(qat)).graph_module, pm.log


def convert_qat(qat: QATModel, verify: bool = True) -> Artifact:
    """QAT model -> reference graph (batch-norm folded, the fake-quants' parameters) -> backend artifact."""
    if not isinstance(qat, QATModel):
        raise ConfigError(f"convert_qat() takes the model returned by qcompile.prepare_qat(), got {type(qat).__name__}")
    for fq in qat.fake_quants().values():
        if not fq.is_initialized:
            raise CalibrationError(f"no data reached the fake-quant at {fq.name!r}: train (or calibrate) the QAT "
                                   f"model before convert()")
    t0 = time.perf_counter()
    ref, log = reference_graph(qat)
    names = {n.name for n in ref.graph.nodes}
    ctx = dataclasses.replace(qat._ctx, float_gm=float_model(qat), timings=dict(qat._ctx.timings),
                              rows=[r for r in qat._ctx.rows if r.name in names], pass_log=qat._ctx.pass_log + log)
    ctx.timings["convert_s"] = time.perf_counter() - t0
    return pipeline.finish(ref, ctx, verify=verify)
