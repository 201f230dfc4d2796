"""Low-bit weight formats: 4-bit nibble packing, NF4 (QLoRA) codes and double-quantized scales.

Representation in the reference graph
-------------------------------------
* int2..int8 weights (uniform grid) use the standard ``quantized_decomposed`` dequantize ops; 4-bit
  values sit in an 8-bit container there (the x86 lowering packs them two per byte).
* NF4 weights have no standard op, so this module registers two custom ops:

  ``qcompile::dequantize_nf4(Tensor packed, Tensor absmax, int group_size) -> Tensor``
      ``packed`` uint8 ``[N, K/2]`` (element ``2i`` in the low nibble), ``absmax`` fp32 ``[N, K/g]``;
      returns ``NF4[code] * absmax`` as fp32 ``[N, K]``.
  ``qcompile::dequantize_scales(Tensor codes, Tensor scale, Tensor offset, int block) -> Tensor``
      double quantization: uint8 ``codes`` ``[N, K/g]`` dequantized per block of ``block`` consecutive
      entries as ``codes * scale[b] + offset[b]`` (fp32 ``scale`` / ``offset`` of ``ceil(n / block)``).

NF4 codes are the 16 quantiles of a standard normal, rescaled to [-1, 1], with an exact zero
(Dettmers et al., QLoRA 2023). QLoRA double-quantizes the absmax scales to 8-bit floats per block
of 256; here they are 8-bit *affine* per block (min / step per block), which keeps small scales
within half a step as well and costs 64 bits per 256 scales.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NF4_TABLE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)
_NF4_MIDPOINTS = (NF4_TABLE[1:] + NF4_TABLE[:-1]) / 2


# -- nibble packing ----------------------------------------------------------------------------
def pack_int4(codes: Tensor) -> Tensor:
    """``[..., K]`` integers in [0, 15] (K even) -> uint8 ``[..., K/2]``, element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., K/2]`` -> uint8 ``[..., K]`` in [0, 15]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


# -- NF4 --------------------------------------------------------------------------------------
def nf4_codes(x: Tensor) -> Tensor:
    """Nearest NF4 code of each value of ``x`` (already divided by its absmax, so within [-1, 1])."""
    return torch.bucketize(x.float().clamp(-1, 1), _NF4_MIDPOINTS).to(torch.uint8)


def nf4_values(codes: Tensor) -> Tensor:
    return NF4_TABLE[codes.long()]


@dataclass(frozen=True)
class NF4Params:
    """Scales of an NF4 weight: ``absmax`` fp32 ``[N, K/g]`` as used for rounding (already the
    double-quantized value when ``scale_codes`` is set), plus the stored double-quant form."""

    absmax: Tensor
    group_size: int
    scale_codes: Tensor | None = None   # uint8 [N, K/g]
    scale_scale: Tensor | None = None   # fp32 [n_blocks]
    scale_offset: Tensor | None = None  # fp32 [n_blocks]
    scale_block: int = 256


def _blocks(flat: Tensor, block: int) -> Tensor:
    pad = (-flat.numel()) % block
    return torch.nn.functional.pad(flat, (0, pad), value=float(flat[-1])).reshape(-1, block)


def double_quantize(absmax: Tensor, block: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """uint8 codes (shape of ``absmax``), fp32 step and offset per block of ``block`` scales."""
    b = _blocks(absmax.flatten().float(), block)
    lo, hi = b.amin(1), b.amax(1)
    step = ((hi - lo) / 255).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round((b - lo[:, None]) / step[:, None]).clamp(0, 255).to(torch.uint8)
    return codes.flatten()[:absmax.numel()].reshape(absmax.shape), step, lo


def dequantize_scales_ref(codes: Tensor, scale: Tensor, offset: Tensor, block: int) -> Tensor:
    """``codes * scale[b] + offset[b]`` per block ``b`` of ``block`` consecutive codes: one broadcast over a
    ``[blocks, block]`` view (an index gather per element cost 1.5 ms per 4096x4096 layer, more than the
    NF4 GEMV it feeds)."""
    flat = codes.flatten().float()
    n = flat.numel()
    if n % block:
        flat = torch.nn.functional.pad(flat, (0, -n % block))
    out = flat.view(-1, block) * scale[:, None] + offset[:, None]
    return out.flatten()[:n].reshape(codes.shape)


def nf4_params(w: Tensor, group_size: int, double_quant: bool = True, scale_block: int = 256) -> NF4Params:
    """Per-group absmax of a 2-D weight (groups along the last axis), double-quantized if asked."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"nf4 needs the input dimension {k} to be a multiple of group_size={group_size}")
    absmax = w.detach().float().reshape(n, k // group_size, group_size).abs().amax(-1)
    absmax = absmax.clamp_min(torch.finfo(torch.float32).eps)
    if not double_quant:
        return NF4Params(absmax, group_size)
    codes, step, lo = double_quantize(absmax, scale_block)
    used = dequantize_scales_ref(codes, step, lo, scale_block).clamp_min(torch.finfo(torch.float32).eps)
    return NF4Params(used, group_size, codes, step, lo, scale_block)


def nf4_quantize(w: Tensor, p: NF4Params) -> Tensor:
    """Codes uint8 ``[N, K]`` of ``w`` on the grid ``NF4 * absmax``."""
    n, k = w.shape
    scale = p.absmax.repeat_interleave(p.group_size, dim=1)
    return nf4_codes(w.float() / scale)


def nf4_dequantize_ref(codes: Tensor, absmax: Tensor, group_size: int) -> Tensor:
    return nf4_values(codes) * absmax.repeat_interleave(group_size, dim=1)


# -- custom ops (reference-graph vocabulary) ---------------------------------------------------
_BYTE = torch.arange(256)
_NF4_PAIRS = torch.stack([NF4_TABLE[_BYTE & 15], NF4_TABLE[_BYTE >> 4]], dim=-1)  # byte -> its two values


@torch.library.custom_op("qcompile::dequantize_nf4", mutates_args=())
def dequantize_nf4(packed: Tensor, absmax: Tensor, group_size: int) -> Tensor:
    n = packed.shape[0]
    pairs = torch.nn.functional.embedding(packed.int(), _NF4_PAIRS)  # one gather per byte: [N, K/2, 2]
    return (pairs.reshape(n, -1, group_size) * absmax.reshape(n, -1, 1)).reshape(n, -1)


@dequantize_nf4.register_fake
def _(packed, absmax, group_size):
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=torch.float32)


@torch.library.custom_op("qcompile::dequantize_scales", mutates_args=())
def dequantize_scales(codes: Tensor, scale: Tensor, offset: Tensor, block: int) -> Tensor:
    return dequantize_scales_ref(codes, scale, offset, block)


@dequantize_scales.register_fake
def _(codes, scale, offset, block):
    return codes.new_empty(codes.shape, dtype=torch.float32)


NF4_OPS = (torch.ops.qcompile.dequantize_nf4.default, torch.ops.qcompile.dequantize_scales.default)
