"""qcompile's own ONNX ops: torch custom ops the pre-export pass (``prepare.py``) puts in the graph, and
their onnxscript translations, handed to ``torch.onnx.export(custom_translation_table=TRANSLATIONS)``.

Everything else (ATen ops, ``quantized_decomposed`` Q/DQ) is translated by onnxscript's torch_lib.
These ops exist because what ONNX Runtime runs fastest for the dynamic and weight-only modes is not a
composition torch_lib would write from the reference graph:

* ``dynamic_quantize(x)``            -> ``DynamicQuantizeLinear`` (uint8 tensor, scale, zero point)
* ``matmul_integer(xq, ..., W^T)``   -> ``MatMulInteger -> Cast -> Mul(x_scale * w_scale) [-> Add(bias)]``, the form
  ORT's own ``quantize_dynamic`` writes; ORT fuses it into DynamicQuantizeMatMul / MatMulIntegerToFloat
* ``matmul_nbits(x, B, scales, ...)`` -> ``com.microsoft.MatMulNBits`` (2/4/8-bit blocks along K)
* ``matmul_bnb4(x, B, absmax)``      -> ``com.microsoft.MatMulBnb4`` (NF4)
* ``embedding_rows(ids, codes, ...)`` -> ``Gather(int8 rows) -> Cast [-> Sub(Gather(zero points))] -> Mul(Gather(scales))``

Each op's eager implementation computes the same numbers from the same stored tensors (tests run them);
``torch.export`` only needs the fake implementations.
"""
from __future__ import annotations

import onnxscript
import torch
from onnxscript import opset18 as op
from torch import Tensor

from qcompile.lowbit import nf4_values

MS = onnxscript.values.Opset("com.microsoft", 1)
NS = "qcompile_onnx"
_TYPES = ["tensor(float)", "tensor(float16)", "tensor(uint8)", "tensor(int8)", "tensor(int32)", "tensor(int64)"]


def _ms_op(name: str, inputs: list, attrs: list):
    """An onnxscript op of ORT's ``com.microsoft`` domain. onnx has no schema for them (and must not: the
    checker would then judge ORT's ops by ours), so the schema is built here, for the tracer only.
    ``inputs``: names, a trailing ``?`` marks an optional one."""
    from onnx.defs import OpSchema
    opt, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
    params = [OpSchema.FormalParameter(n.rstrip("?"), f"T{i}", param_option=opt if n.endswith("?") else single)
              for i, n in enumerate(inputs)]
    schema = OpSchema(name, "com.microsoft", 1, inputs=params,
                      outputs=[OpSchema.FormalParameter("Y", "TY")],
                      type_constraints=[(f"T{i}", _TYPES, "") for i in range(len(inputs))] + [("TY", _TYPES, "")],
                      attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in attrs])
    return onnxscript.values.Op(MS, name, schema)


_MATMUL_NBITS = _ms_op("MatMulNBits", ["A", "B", "scales", "zero_points?", "g_idx?", "bias?"],
                       ["K", "N", "bits", "block_size", "accuracy_level"])
_MATMUL_BNB4 = _ms_op("MatMulBnb4", ["A", "B", "absmax"], ["K", "N", "block_size", "quant_type"])


# ----------------------------------------------------------------------------- torch side
@torch.library.custom_op(f"{NS}::dynamic_quantize", mutates_args=())
def dynamic_quantize(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    qd = torch.ops.quantized_decomposed
    s, z = qd.choose_qparams.tensor(x, 0, 255, eps, torch.uint8)
    q = qd.quantize_per_tensor.tensor(x, s, z, 0, 255, torch.uint8)
    return q, s.float().reshape(()), z.to(torch.uint8).reshape(())


@dynamic_quantize.register_fake
def _(x, eps):
    return (torch.empty_like(x, dtype=torch.uint8), x.new_empty((), dtype=torch.float32),
            x.new_empty((), dtype=torch.uint8))


@torch.library.custom_op(f"{NS}::matmul_integer", mutates_args=())
def matmul_integer(xq: Tensor, x_scale: Tensor, x_zp: Tensor, w_t: Tensor, w_scale: Tensor,
                   w_zp: Tensor | None, bias: Tensor | None) -> Tensor:
    w = w_t.float() - (w_zp.float() if w_zp is not None else 0.0)
    y = ((xq.float() - x_zp.float()) @ w) * (x_scale * w_scale)
    return y + bias if bias is not None else y


@matmul_integer.register_fake
def _(xq, x_scale, x_zp, w_t, w_scale, w_zp, bias):
    return xq.new_empty((*xq.shape[:-1], w_t.shape[1]), dtype=torch.float32)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of ``lowbit_pack.pack_bits``: uint8 [..., L] -> codes [..., count] (first code in the low bits)."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (packed.int()[..., None] >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count]


@torch.library.custom_op(f"{NS}::matmul_nbits", mutates_args=())
def matmul_nbits(x: Tensor, b: Tensor, scales: Tensor, zero_points: Tensor | None, bias: Tensor | None,
                 K: int, N: int, bits: int, block_size: int, accuracy_level: int) -> Tensor:
    nb = b.shape[1]
    codes = unpack_bits(b, bits, block_size).float()                       # [N, nb, block]
    zp = (unpack_bits(zero_points, bits, nb).float() if zero_points is not None
          else torch.full((N, nb), float(2 ** (bits - 1))))
    w = ((codes - zp[..., None]) * scales.reshape(N, nb)[..., None]).reshape(N, -1)[:, :K]
    y = x @ w.t()
    return y + bias if bias is not None else y


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, bias, K, N, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], N))


@torch.library.custom_op(f"{NS}::matmul_bnb4", mutates_args=())
def matmul_bnb4(x: Tensor, b: Tensor, absmax: Tensor, K: int, N: int, block_size: int) -> Tensor:
    codes = torch.stack([b.int() >> 4, b.int() & 15], -1).reshape(-1)     # first code in the high nibble
    w = (nf4_values(codes).reshape(-1, block_size) * absmax.reshape(-1, 1)).reshape(N, K)
    return x @ w.t()


@matmul_bnb4.register_fake
def _(x, b, absmax, K, N, block_size):
    return x.new_empty((*x.shape[:-1], N))


@torch.library.custom_op(f"{NS}::embedding_rows", mutates_args=())
def embedding_rows(ids: Tensor, codes: Tensor, scales: Tensor, zero_points: Tensor | None) -> Tensor:
    rows = codes[ids].float()
    if zero_points is not None:
        rows = rows - zero_points[ids]
    return rows * scales[ids]


@embedding_rows.register_fake
def _(ids, codes, scales, zero_points):
    return codes.new_empty((*ids.shape, codes.shape[1]), dtype=torch.float32)


# ----------------------------------------------------------------------------- ONNX side
def onnx_dynamic_quantize(x, eps: float):
    return op.DynamicQuantizeLinear(x)


def onnx_dequantize_tensor(q, scale, zero_point, quant_min: int, quant_max: int, dtype: int):
    """``dequantize_per_tensor.tensor`` on a ``dynamic_quantize`` output (scale / zero point are tensors)."""
    return op.DequantizeLinear(q, scale, zero_point)


def onnx_matmul_integer(xq, x_scale, x_zp, w_t, w_scale, w_zp=None, bias=None):
    acc = op.MatMulInteger(xq, w_t, x_zp, w_zp) if w_zp is not None else op.MatMulInteger(xq, w_t, x_zp)
    y = op.Mul(op.Cast(acc, to=1), op.Mul(x_scale, w_scale))
    return op.Add(y, bias) if bias is not None else y


def onnx_matmul_nbits(x, b, scales, zero_points=None, bias=None, K: int = 0, N: int = 0, bits: int = 4,
                      block_size: int = 32, accuracy_level: int = 0):
    return _MATMUL_NBITS(x, b, scales, zero_points, None, bias, K=K, N=N, bits=bits, block_size=block_size,
                          accuracy_level=accuracy_level)


def onnx_matmul_bnb4(x, b, absmax, K: int = 0, N: int = 0, block_size: int = 64):
    return _MATMUL_BNB4(x, b, absmax, K=K, N=N, block_size=block_size, quant_type=1)


def onnx_embedding_rows(ids, codes, scales, zero_points=None):
    rows = op.Cast(op.Gather(codes, ids, axis=0), to=1)
    if zero_points is not None:
        rows = op.Sub(rows, op.Gather(zero_points, ids, axis=0))
    return op.Mul(rows, op.Gather(scales, ids, axis=0))


Q = torch.ops.qcompile_onnx
TRANSLATIONS = {
    Q.dynamic_quantize.default: onnx_dynamic_quantize,
    Q.matmul_integer.default: onnx_matmul_integer,
    Q.matmul_nbits.default: onnx_matmul_nbits,
    Q.matmul_bnb4.default: onnx_matmul_bnb4,
    Q.embedding_rows.default: onnx_embedding_rows,
    torch.ops.quantized_decomposed.dequantize_per_tensor.tensor: onnx_dequantize_tensor,
}
# the ONNX op each custom op becomes, and the ORT kernels that may replace it (kernel notes follow them)
ONNX_OP = {"matmul_integer": "MatMulInteger", "matmul_nbits": "MatMulNBits", "matmul_bnb4": "MatMulBnb4",
           "embedding_rows": "Gather"}
