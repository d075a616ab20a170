"""Bit packing of unsigned integer codes into bytes.

Codes are packed along the last dimension, least significant bits first, into ``uint8``:

* 8 bits: one code per byte;
* 4 bits: byte ``j`` of a row holds element ``2j`` in its low nibble and ``2j + 1`` in its high
  nibble (the layout the Triton kernels unpack in registers);
* 2 bits: byte ``j`` holds elements ``4j .. 4j + 3``, from the low bits up;
* 3 bits: a little-endian bit stream, 8 codes in 3 bytes.

A row whose bit length is not a whole number of bytes is padded with zero bits.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (2, 3, 4, 8)


def packed_cols(cols: int, bits: int) -> int:
    """Bytes per row after packing ``cols`` codes of ``bits`` bits."""
    return (cols * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[..., cols]`` into ``uint8`` ``[..., packed_cols(cols, bits)]``."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; use one of {PACKABLE_BITS}.")
    codes = codes.to(torch.uint8)
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes exceed {bits} bits; quantize them before packing.")
    if bits == 8:
        return codes.clone()
    if bits in (2, 4):  # whole codes per byte: shift and OR, without the bit-stream detour
        per_byte = 8 // bits
        pad = (-codes.shape[-1]) % per_byte
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad))
        lanes = codes.reshape(*codes.shape[:-1], -1, per_byte)
        packed = lanes[..., 0].clone()
        for lane in range(1, per_byte):
            packed |= lanes[..., lane] << (lane * bits)
        return packed
    *lead, cols = codes.shape
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(*lead, cols * bits)  # LSB first
    pad = (-stream.shape[-1]) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = 1 << torch.arange(8, dtype=torch.int32, device=codes.device)
    return (stream.reshape(*lead, -1, 8).to(torch.int32) * weights).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8`` ``[..., bytes]`` back to codes ``[..., cols]``."""
    if bits == 8:
        return packed[..., :cols]
    if bits == 4:  # the common case, without the bit-stream detour
        return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)[..., :cols]
    *lead, nbytes = packed.shape
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*lead, nbytes * 8)
    stream = stream[..., : cols * bits].reshape(*lead, cols, bits).to(torch.int32)
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=packed.device)
    return (stream * weights).sum(dim=-1).to(torch.uint8)
