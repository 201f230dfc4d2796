"""The x86 backend: support table -> annotations; reference graph -> quantized CPU kernels."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from qcompile.config import QConfig
from qcompile.errors import ConfigError
from qcompile.specs import ActivationSpec, QuantSpec, WeightSpec
from qcompile.passes.annotate import Annotate, SpecMaker
from qcompile.passes.fold_batch_norm import FoldBatchNorm
from qcompile.passes.fuse import FuseGroups
from qcompile.passes.normalize import Normalize
from qcompile.passes.pattern import Rule, RuleSet

from . import support
from .lower import Lowerer, LowerResult
from .rules import RULES


@dataclass(frozen=True)
class X86Options:
    """engine: quantized engine used to pack weights ("x86" picks fbgemm/oneDNN per shape).
    act_reduce_range: 7-bit activations (torch.ao's AVX2 work-around for u8*s8 int16 saturation).
      Measured on ResNet-18 (docs/x86-kernels.md): full-range u8 activations with 8-bit weights agree
      with the reference graph within one step, and give ~3.6 dB more SQNR than reduce_range.
    max_weight_bits: cap on weight bits (7 would keep every u8 x s7 pair sum inside int16; costs ~5 dB).
    channels_last: quantize 4-D inputs in channels-last layout, the layout the int8 conv kernels use."""

    engine: str = "x86"
    act_reduce_range: bool = False
    max_weight_bits: int = 8
    channels_last: bool = True


@contextlib.contextmanager
def quantized_engine(name: str):
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


class X86Backend:
    name = "x86"

    def __init__(self, **options):
        try:
            self.options = X86Options(**options)
        except TypeError as e:
            raise ConfigError(f"x86 backend: {e}; options are {list(X86Options.__dataclass_fields__)}") from e
        if self.options.engine not in torch.backends.quantized.supported_engines:
            raise ConfigError(f"x86 backend: engine {self.options.engine!r} is not in this torch build "
                              f"({torch.backends.quantized.supported_engines})")

    def is_available(self):
        engines = torch.backends.quantized.supported_engines
        if not any(e in engines for e in ("x86", "fbgemm", "onednn")):
            return False, f"this torch build has no x86 quantized engine (has {engines})"
        return True, ""

    def support_table(self):
        return support.TABLE

    def capabilities(self):
        return support.CAPABILITIES

    def default_config(self) -> QConfig:
        return QConfig(weights=WeightSpec(bits=8, granularity="per_channel", symmetric=True),
                       activations=ActivationSpec(observer="mse"))

    def fusion_rules(self) -> RuleSet:
        return RuleSet(Rule(row.name, row.ops) for row in support.TABLE)

    def act_spec(self, a: ActivationSpec) -> QuantSpec:
        return QuantSpec(dtype=torch.uint8, bits=a.bits, symmetric=a.symmetric,
                         reduce_range=self.options.act_reduce_range, observer=a.observer, percentile=a.percentile)

    def weight_spec(self, w: WeightSpec, row, node) -> QuantSpec:
        gran = w.granularity if w.granularity in row.weight_granularities else "per_tensor"
        return QuantSpec(dtype=torch.int8, bits=min(w.bits, self.options.max_weight_bits), symmetric=True,
                         granularity=gran, axis=0 if gran == "per_channel" else None, observer=w.observer)

    def prepare_passes(self, config: QConfig) -> list:
        return [Normalize(), FoldBatchNorm(), FuseGroups(self.fusion_rules()),
                Annotate(support.TABLE, config, SpecMaker(self.act_spec, self.weight_spec), self.name, support.NOTES)]

    def lower(self, reference, example_inputs) -> LowerResult:
        with quantized_engine(self.options.engine):
            return Lowerer(reference, self.fusion_rules(), RULES, self.options.channels_last).run()

    def runtime_name(self) -> str:
        return f"PyTorch quantized CPU kernels (engine={self.options.engine})"

    def run(self, lowered: LowerResult, args, kwargs):
        with torch.no_grad():
            return lowered.gm(*args, **kwargs)

    def save_payload(self, lowered) -> None:
        return None  # the .qc file stores the reference graph; load() lowers it again
