"""The ExecuTorch backend: support table -> annotations; reference graph -> .pte with XNNPACK delegation."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from qcompile.config import QConfig
from qcompile.errors import ConfigError
from qcompile.passes.annotate import SpecMaker
from qcompile.passes.fold_hardsigmoid import FoldHardsigmoid
from qcompile.specs import ActivationSpec, QuantSpec, WeightSpec

from ..table import ModeTable, TableBackend
from . import dynamic, support

INSTALL_HINT = "pip install executorch==1.5.1 torchao==0.18.*"
_REQUIRED = ("executorch", "torchao")
_MODULES = ("executorch.exir", "executorch.runtime",
            "executorch.backends.xnnpack.partition.xnnpack_partitioner", "executorch.devtools.backend_debug")


@dataclass(frozen=True)
class ExecuTorchOptions:
    """narrow_weights: 8-bit symmetric weights in [-127, 127] (XNNPACKQuantizer's range; keeps -128 unused).
        Weights of 4..7 bits always use the full signed range [-2**(b-1), 2**(b-1) - 1] ([-8, 7] at 4
        bits, as the x86 backend and XNNPACK's qc4w): their codes sit far from -128 anyway.
    num_threads: size of ExecuTorch's XNNPACK thread pool when running (None: leave the runtime default).
        The pool is process-wide: the last value set wins.
    duplicate_dequant: give every consumer its own dequantize node before export (what PT2E's
        convert_pt2e does; XNNPACK's partitioner claims a dequantize together with its one consumer).
    fold_hardsigmoid: rewrite conv / linear -> hardsigmoid as conv' / linear' -> hardtanh(0, 1) (weights / 6,
        bias (b + 3) / 6; passes/fold_hardsigmoid.py): one int8 GEMM with a fused clamp instead of
        fp32 add / clamp / divide plus conversions and transposes around them.
    channels_last_inputs: transpose a 4-D float graph input to NHWC in fp32 before quantizing it
        (XNNPACK's x32 transpose), instead of after, as int8 (its slower x8 transpose); see
        lower.channels_last_inputs.
    float_depthwise: opt-in. A depthwise conv whose consumers are all float keeps int8 input and weights but
        computes in fp32 with a float output (depthwise.py). On an x86 host XNNPACK's fp32 depthwise is the
        faster, but the .pte then stores those weights in fp32 and their MACs are not int8; off by default
        (a .pte is for phones, whose int8 depthwise kernels this machine cannot measure).
    dynamic_output_linears: a linear whose output is a model output runs XNNPACK's dynamically quantized GEMM
        (input quantized per row at run time, int8 weights and compute, fp32 output; output_gemm.py), with
        quantize_outputs True or False: an int8 output clips values beyond the calibrated range. False: the
        linear writes int8 (quantize_outputs=True) or runs in fp32 on dequantized weights (False)."""

    narrow_weights: bool = True
    num_threads: int | None = None
    duplicate_dequant: bool = True
    fold_hardsigmoid: bool = True
    channels_last_inputs: bool = True
    float_depthwise: bool = False
    dynamic_output_linears: bool = True


class ExecuTorchBackend(TableBackend):
    name = "executorch"
    Options = ExecuTorchOptions
    file_extensions = (".pte",)
    static_notes = support.NOTES
    mode_capabilities = {"static": support.CAPABILITIES, "dynamic": dynamic.CAPABILITIES}

    def check_options(self) -> None:
        if self.options.num_threads is not None and self.options.num_threads < 1:
            raise ConfigError(f"executorch backend: num_threads must be >= 1, got {self.options.num_threads}")

    # -- availability -----------------------------------------------------------------------------
    def is_available(self):
        missing = [pkg for pkg in _REQUIRED if importlib.util.find_spec(pkg) is None]
        if missing:
            return False, f"missing Python package(s) {', '.join(missing)}: {INSTALL_HINT}"
        for mod in _MODULES:
            try:
                importlib.import_module(mod)
            except Exception as e:  # noqa: BLE001 - any import failure means the runtime is unusable
                return False, f"{mod} failed to import ({type(e).__name__}: {e}); reinstall: {INSTALL_HINT}"
        from executorch.runtime import Runtime
        if not Runtime.get().backend_registry.is_available("XnnpackBackend"):
            return False, f"this executorch build has no XNNPACK runtime backend: {INSTALL_HINT}"
        return True, ""

    # -- annotation -------------------------------------------------------------------------------
    def support_table(self):
        return support.TABLE

    def float_mode_table(self, mode: str) -> ModeTable | None:
        """dynamic: linears with int8 weights whose inputs XNNPACK quantizes per row at run time (dynamic.py)."""
        if mode != "dynamic":
            return None
        return ModeTable(dynamic.DYNAMIC_TABLE, dict(dynamic.DYNAMIC_NOTES),
                         SpecMaker(dynamic.act_spec, dynamic.weight_spec))

    def default_config(self, mode: str) -> QConfig:
        if mode == "dynamic":
            return dynamic.default_config()
        # quantize_outputs: a float-output conv would run in fp32 on dequantized weights (XNNPACK has no static
        # int8-input / fp32-output GEMM); a linear feeding a model output runs XNNPACK's dynamically quantized
        # GEMM either way (dynamic_output_linears, output_gemm.py)
        return QConfig(weights=WeightSpec(bits=8, granularity="per_channel", symmetric=True),
                       activations=ActivationSpec(observer="mse"), quantize_outputs=True)

    def act_spec(self, a: ActivationSpec) -> QuantSpec:
        return QuantSpec(dtype=torch.int8, bits=a.bits, symmetric=a.symmetric, observer=a.observer,
                         percentile=a.percentile)

    def weight_spec(self, w: WeightSpec, row, node) -> QuantSpec:
        gran = w.granularity if w.granularity in row.weight_granularities else "per_tensor"
        narrow = self.options.narrow_weights and w.bits == 8
        return QuantSpec(dtype=torch.int8, bits=w.bits, symmetric=True, narrow=narrow,
                         granularity=gran, axis=0 if gran == "per_channel" else None, observer=w.observer)

    def extra_passes(self, config, mode: str) -> tuple[list, list]:
        if mode == "dynamic":  # float everywhere but the linears: no gate folding, no depthwise int8
            return [], [dynamic.Bf16GroupScales()]
        before = [FoldHardsigmoid()] if self.options.fold_hardsigmoid else []
        from .output_gemm import DynamicOutputLinears
        # a linear feeding the model output: int8 weights and compute, fp32 result (not clipped). Not in QAT: the
        # model trained with its input's static fake-quant, and convert keeps what it trained with
        after = [DynamicOutputLinears()] if self.options.dynamic_output_linears and mode == "static" else []
        if self.options.float_depthwise:
            from .depthwise import FloatDepthwiseOutput
            after.append(FloatDepthwiseOutput())
        return before, after

    # -- lowering and running ---------------------------------------------------------------------
    def lower_options(self):
        from .lower import LowerOptions
        return LowerOptions(self.options.duplicate_dequant, self.options.channels_last_inputs)

    def lower(self, reference, example_inputs, mode: str):
        from .lower import lower_reference
        return lower_reference(reference, example_inputs, self.lower_options())

    def runtime_name(self) -> str:
        try:
            from executorch.version import __version__ as version
        except ImportError:
            version = "?"
        return f"ExecuTorch {version} + XNNPACK"

    def run(self, lowered, args, kwargs):
        from .runtime import set_threads
        if self.options.num_threads is not None:
            set_threads(self.options.num_threads)
        return lowered.program.run(args, kwargs)

    def save(self, artifact, path: str) -> None:
        """Write the .pte program (Artifact.save hands us a temporary path and renames it atomically)."""
        with open(path, "wb") as f:
            f.write(artifact.lowered.program.buffer)

    def verify_runtime(self, artifact, mode: str) -> dict:
        from .verify import verify_runtime
        return verify_runtime(artifact)
