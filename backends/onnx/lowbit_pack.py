"""Weight layouts of ONNX Runtime's low-bit kernels (``com.microsoft`` MatMulNBits / MatMulBnb4).

MatMulNBits (int2..int8 uniform weights): ``B`` uint8 [N, K/block, block*bits/8] (codes unsigned, the first
in the low bits, zero-padded to whole blocks), ``scales`` fp32 [N, K/block], ``zero_points`` packed the
same way or absent (default 2^(bits-1)). 3-bit values ride in 4-bit blocks, 5..7-bit ones in 8-bit blocks.
MatMulBnb4 (NF4): ``B`` uint8 [N*K/2] with the first code in the *high* nibble (bitsandbytes order).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .modes import block_size


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``codes`` [..., L] (< 2**bits) -> uint8 [..., ceil(L * bits / 8)]: element i of each byte
    in bits ``[i * bits, (i + 1) * bits)`` (the first code in the low bits), zero-padded."""
    per = 8 // bits
    pad = (-codes.shape[-1]) % per
    c = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), codes.dtype)], -1).astype(np.uint8)
    c = c.reshape(codes.shape[:-1] + (-1, per))
    out = np.zeros(c.shape[:-1], np.uint8)
    for i in range(per):
        out |= (c[..., i] << (bits * i)).astype(np.uint8)
    return out


def container_bits(bits: int) -> int:
    """The MatMulNBits width holding ``bits``-bit values (it runs 2, 4 and 8)."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def accuracy_level(option: int | None, cbits: int) -> int:
    """fp32 activations (0) for 2/4-bit blocks: exact vs the reference and faster than fp32 MatMul; int8
    (4) for 8-bit blocks: ORT 1.32 has no fast fp32 path for them (10x slower than fp32 MatMul, measured)."""
    return option if option is not None else (0 if cbits <= 4 else 4)


@dataclass
class NBits:
    b: torch.Tensor              # uint8 [N, K/block, block*bits/8]
    scales: torch.Tensor         # fp32 [N, K/block]
    zero_points: torch.Tensor | None
    k: int
    n: int
    bits: int                    # container width (2 / 4 / 8)
    block: int


def nbits_layout(iw) -> NBits | None:
    """An ``IntWeight`` (``qcompile.int_weight``: the reference graph's integer weight) in MatMulNBits' layout, or None if its
    codes or zero points do not fit the container."""
    n, k = iw.q.shape
    g = iw.group_size
    block = block_size(k, g)
    nb = -(-k // block)
    if g:
        s, z = iw.grouped(k, g)                              # [N, K/g]
        s, z = s.repeat_interleave(g // block, 1), z.repeat_interleave(g // block, 1)
    else:
        s, z = iw.per_row(n)
        s, z = s[:, None].expand(n, nb), z[:, None].expand(n, nb)
    cbits = container_bits(iw.bits)
    shift = 2 ** (cbits - 1) if iw.quant_min < 0 else 0      # signed codes -> unsigned blocks
    codes = (iw.q.int() + shift).numpy()
    zp = z.round().int().numpy() + shift
    if codes.min() < 0 or codes.max() >= 2**cbits or zp.min() < 0 or zp.max() >= 2**cbits:
        return None
    codes = np.concatenate([codes, np.zeros((n, nb * block - k), codes.dtype)], 1).reshape(n, nb, block)
    zps = torch.from_numpy(pack_bits(zp, cbits)) if (zp != 2 ** (cbits - 1)).any() else None
    return NBits(torch.from_numpy(pack_bits(codes, cbits)), s.float().contiguous(), zps, k, n, cbits, block)
