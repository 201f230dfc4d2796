"""The x86 backend: support table -> annotations; reference graph -> quantized CPU kernels."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from qcompile.config import QConfig
from qcompile.errors import ConfigError
from qcompile.ir import plain_signature
from qcompile.specs import ActivationSpec, QuantSpec, WeightSpec
from qcompile.passes.annotate import SpecMaker
from qcompile.passes.decompose_sdpa import DecomposeSDPA
from qcompile.passes.float_output import FloatOutputLinears
from qcompile.passes.dynamic import AnnotateRecurrent

from ..base import Lowered
from ..table import ModeTable, TableBackend
from . import dynamic, rules, support, weight_only
from .conv_weights import FullRangeConvWeights
from .kernel_choice import EngineChooser, available_families, cpu_has_vnni, quantized_engine
from .lower import Lowerer
from .rules import RULES


@dataclass(frozen=True)
class X86Options:
    """engine: quantized engine used to pack weights. "auto" (default): each conv / linear packed for both
      kernel families (fbgemm, oneDNN), timed on its input shape and the faster kept, cached per CPU
      (kernel_choice.py; the d=384 encoder's linears run 7-16 % faster on oneDNN on AVX-512 VNNI, torch's
      own "x86" rule puts every linear on fbgemm). "x86": torch's fixed rule, no measuring; "fbgemm" /
      "onednn": one family.
    act_reduce_range: 7-bit activations (torch.ao's AVX2 work-around for u8*s8 int16 saturation).
      Measured on ResNet-18 (docs/x86-kernels.md): full-range u8 activations with 8-bit weights agree
      with the reference graph within one step, and give ~3.6 dB more SQNR than reduce_range.
    max_weight_bits: cap on weight bits; None picks by CPU: 8 with VNNI (exact int32 dot products),
      7 without (AVX2 u8 x s8 pair sums saturate int16; u8 x s7 cannot). Depthwise convs: fbgemm's kernel
      adds u8 x s8 pairs in int16 even on VNNI (docs/x86-kernels.md), so their per-channel 8-bit weights
      take the "pair_sum" range -- any two same-sign codes of a channel sum to <= 128, which cannot
      saturate and is finer than the 7-bit codes used before (EfficientNet-Lite2's first depthwise conv
      had cost 23.5 dB of logit SQNR alone); with max_weight_bits set or another observer asked, 7 bits.
    channels_last: quantize 4-D inputs in channels-last layout, the layout the int8 conv kernels use.
    exact_quantize: quantize float values entering int8 regions with the reference graph's own op
      (round(x * (1/scale)), bit-exact with the reference). Default False: ``torch.quantize_per_tensor``,
      one native pass instead of five (ResNet-18 batch 4 at 224: 0.04 ms instead of 1.1 ms on the input);
      it rounds x / scale, so a value on a rounding tie lands one step away (7 of 602k image values).
    embedding_weights: mode="weight_only" embedding tables: "int8" (8-bit rows, default: a gather gains no
      speed from fewer bits, and int4 tables alone cost MiniLM 0.007 of min cosine) or "same" (as the
      weight config says).
    weight_only_activations: "bf16" (default) or "fp32": the precision the int8 / int4 weight-only kernels
      take activations in. "bf16" allows a reduced precision: qcompile's GEMV (csrc/wo_gemv.c) quantizes x
      per 128-block to int16 (relative error <= 2^-16 of the block's largest |x|, finer than bf16) and sums
      in integers, the body that reaches the memory limit; torch's kernels (where the GEMV is not built or the
      batch is larger) take bf16, as they are vectorised for bf16 only (4096x4096 int4 batch 1: 0.59 ms in
      bf16, 14.5 ms in fp32). "fp32" matches the reference to fp32 rounding.
    float_output_linears: static mode: a linear whose consumers are all float (a transformer's output
      projection and second FFN linear feeding the residual add; a classifier head with
      quantize_outputs=False) runs as one int8 GEMM with an fp32 result instead of GEMM + requantize +
      dequantize (passes/float_output.py). d=384 x 6 encoder: 40.4 -> 41.8 dB against float. A linear
      feeding the model output (quantize_outputs=False) always runs this kernel (it used to run in fp32).
    attention: static mode: "auto" (default) runs attention's Q.K^T and P.V on the int8 batched kernel where
      that measured faster -- the AVX-512 VNNI kernel is built and each head's product has at least
      128 x 64 x 128 multiply-adds -- and in fp32 elsewhere (SDPA kept fused; an eager attention's matmuls not
      quantized; the Q / K / V projections then write fp32). "int8": always int8 (SDPA written out by
      passes/decompose_sdpa.py, Q.K^T with an fp32 result). "float": always fp32. Measured on the Zen 4
      (docs/backends/x86.md), int8 / fp32 attention latency: 1.29 at d=64 seq 16, 1.14 at d=384 seq 32, 0.92
      at seq 128, 0.89 at seq 512; int8 attention was 0.1-0.8 dB further from float on every shape.
    depthwise_full_range: static mode, on VNNI CPUs: an int8-output depthwise conv takes full-range 8-bit
      weights and runs on oneDNN, whose VNNI sums are exact (conv_weights.py), instead of the "pair_sum" range
      fbgemm's int16 pair sums need. EfficientNet-Lite2, 8-bit-pixel crops (docs/accuracy.md): 94.9 -> 98.0 %
      top-1 agreement. False keeps the pair_sum range and lets the engine choice pick fbgemm. Off without
      VNNI and with engine="fbgemm"."""

    engine: str = "auto"
    act_reduce_range: bool = False
    max_weight_bits: int | None = None
    channels_last: bool = True
    exact_quantize: bool = False
    embedding_weights: str = "int8"
    weight_only_activations: str = "bf16"
    float_output_linears: bool = True
    attention: str = "auto"
    depthwise_full_range: bool = True


class X86Backend(TableBackend):
    name = "x86"
    Options = X86Options
    rule_help = "fn(match) -> rules.Emitted | reason string (match.ctx: the Lowerer; backends/x86/rules.py)"
    mode_capabilities = {"static": support.CAPABILITIES, **support.MODE_CAPABILITIES}

    def check_options(self) -> None:
        if self.options.weight_only_activations not in ("bf16", "fp32"):
            raise ConfigError(f"x86 backend: weight_only_activations must be 'bf16' or 'fp32', "
                              f"got {self.options.weight_only_activations!r}")
        if self.options.attention not in ("auto", "float", "int8"):
            raise ConfigError(f"x86 backend: attention must be 'auto', 'float' or 'int8', got "
                              f"{self.options.attention!r}")
        if self.options.engine != "auto" and self.options.engine not in torch.backends.quantized.supported_engines:
            raise ConfigError(f"x86 backend: engine {self.options.engine!r} is not in this torch build "
                              f"({torch.backends.quantized.supported_engines})")

    def is_available(self):
        engines = torch.backends.quantized.supported_engines
        if not any(e in engines for e in ("x86", "fbgemm", "onednn")):
            return False, f"this torch build has no x86 quantized engine (has {engines})"
        return True, ""

    # -- what the backend supports (data for TableBackend) ------------------------------------------
    def support_table(self):
        att = self.options.attention
        if att == "int8":
            return support.TABLE
        if att == "float":
            return [row for row in support.TABLE if row.name != support.ACT_MATMUL]
        return [dataclasses.replace(row, check=support.matmul_auto_check) if row.name == support.ACT_MATMUL
                else row for row in support.TABLE]

    @property
    def static_notes(self) -> dict:
        return {**support.NOTES, **support.ATTENTION_NOTES[self.options.attention]}

    def float_mode_table(self, mode: str) -> ModeTable:
        """dynamic / weight_only: the claimed linears (embeddings) compute in float, see dynamic.py / weight_only.py."""
        if mode == "dynamic":
            max_bits = self.options.max_weight_bits or (8 if cpu_has_vnni() else 7)  # AVX2: u8 x s7 cannot saturate
            return ModeTable(support.DYNAMIC_TABLE, support.DYNAMIC_NOTES, SpecMaker(
                dynamic.act_spec, functools.partial(dynamic.weight_spec, max_bits=max_bits)))
        return ModeTable(support.WEIGHT_ONLY_TABLE, support.WEIGHT_ONLY_NOTES, SpecMaker(
            lambda a: None, functools.partial(weight_only.weight_spec, embedding=self.options.embedding_weights)))

    def extra_passes(self, config, mode: str) -> tuple[list, list]:
        if mode not in ("dynamic", "weight_only"):
            convs = rules.conv_float_output_available()
            # convs writing fp32 run on oneDNN, exact in int32 with VNNI: their weights need no pair-sum bound; nor do
            # int8-output depthwise convs packed for oneDNN (depthwise_full_range; not with engine="fbgemm")
            full = [FullRangeConvWeights(self.options.depthwise_full_range and self.options.engine != "fbgemm"
                                         and "onednn" in available_families())] if convs and cpu_has_vnni() else []
            if self.options.attention == "float":  # SDPA fused, in fp32; the linears feeding it write fp32
                return [], [FloatOutputLinears(self.options.float_output_linears, convs=convs)] + full
            # attention as matmul / softmax / matmul: Q.K^T and P.V run int8 ("auto": where large enough)
            keep = support.sdpa_too_small if self.options.attention == "auto" else None
            return [DecomposeSDPA(keep)], [FloatOutputLinears(self.options.float_output_linears, matmuls=True,
                                                              convs=convs)] + full
        if mode != "dynamic":
            return [], []
        specs = self.float_mode_table(mode).specs  # LSTM / GRU: one op each, with a list of weights (no pattern row)
        return [], [AnnotateRecurrent(config, specs.weight, "int8 weights; gate activations quantized at run time")]

    def default_config(self, mode: str) -> QConfig:
        weights = WeightSpec(bits=8, granularity="per_channel", symmetric=True)
        if mode == "dynamic":  # fbgemm per-tensor: fastest (MiniLM 1.9x float), min cosine 0.992; per_token: 0.998, 1.2-1.4x
            return QConfig(weights=weights, activations=ActivationSpec(granularity="per_tensor"))
        if mode == "weight_only":
            return QConfig(weights=weights)
        return QConfig(weights=weights, activations=ActivationSpec(observer="mse"))

    def act_spec(self, a: ActivationSpec) -> QuantSpec:
        return QuantSpec(dtype=torch.uint8, bits=a.bits, symmetric=a.symmetric,
                         reduce_range=self.options.act_reduce_range, observer=a.observer, percentile=a.percentile)

    def weight_spec(self, w: WeightSpec, row, node) -> QuantSpec:
        gran = w.granularity if w.granularity in row.weight_granularities else "per_tensor"
        bits = min(w.bits, self.options.max_weight_bits or (8 if cpu_has_vnni() else 7))
        observer = w.observer
        if _is_depthwise(node):  # fbgemm's depthwise kernel adds u8 x s8 pairs in int16, even on VNNI (measured)
            if w.bits == 8 and gran == "per_channel" and w.observer == "minmax" and self.options.max_weight_bits is None:
                bits = 8  # on AVX2 too: the pair bound is what the 7-bit cap is for
                observer = "pair_sum"  # 8-bit codes whose same-sign pairs cannot saturate: finer than 7 bits
            else:
                bits = min(bits, 7)
        return QuantSpec(dtype=torch.int8, bits=bits, symmetric=True,
                         granularity=gran, axis=0 if gran == "per_channel" else None, observer=observer)

    # -- lowering and running -------------------------------------------------------------------------
    def lower(self, reference, example_inputs, mode: str) -> Lowered:
        """Static int8 groups -> quantized CPU kernels (rules.py; ``with_rules`` adds to them); dynamic /
        weight-only (or a graph with no static activation) -> float-output kernels (dynamic.py, weight_only.py)."""
        auto = self.options.engine == "auto"
        with quantized_engine("x86" if auto else self.options.engine):
            if mode in ("dynamic", "weight_only") or not any(
                    n.target == torch.ops.quantized_decomposed.quantize_per_tensor.default for n in reference.graph.nodes):
                dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[self.options.weight_only_activations]
                r = weight_only.Rewriter(reference, dynamic.RULES + weight_only.RULES, dtype).run()
                plain_signature(r.gm)
                return Lowered(gm=r.gm, kernels=r.kernels, fallbacks=r.fallbacks, taps=r.taps, storage=r.storage)
            lw = Lowerer(reference, self.fusion_rules("static"), self.lowering_rules(RULES), self.options.channels_last,
                         self.options.exact_quantize)
            lw.engine_chooser = EngineChooser() if auto else None  # rules.py: per-layer measured kernel family
            r = lw.run()
            if auto:
                lw.engine_chooser.save()
            plain_signature(r.gm)
            return Lowered(gm=r.gm, kernels=r.kernels, fallbacks=r.fallbacks, taps=r.taps)

    def runtime_name(self) -> str:
        isa = "VNNI" if cpu_has_vnni() else "AVX2"
        return f"PyTorch quantized CPU kernels (engine={self.options.engine}, {isa})"

    def run(self, lowered: Lowered, args, kwargs):
        if not torch.is_grad_enabled():  # the caller's no_grad: skip entering another one (it costs ~50 us
            return lowered.gm(*args, **kwargs)  # when a weight stream has left the caches cold)
        with torch.no_grad():
            return lowered.gm(*args, **kwargs)


def _is_depthwise(node) -> bool:
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return node.target in (torch.ops.aten.conv2d.default, torch.ops.aten.conv1d.default) and int(groups) > 1
