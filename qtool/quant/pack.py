"""Bit packing of signed int codes into int32 words, in compressed-tensors' pack_to_int32 layout.

Element i along the packed dim sits at bit offset i*bits (word i*bits // 32, LSB first) as the unsigned
value q + 2^(bits-1); the last word is zero-padded. For 4 and 8 bits a word is 4 little-endian bytes, so
packing is done on bytes (an offset is an xor on the low bits) and the bytes are reinterpreted as int32:
no int32/int64 temporaries of the full tensor. 1- and 2-bit codes go through a generic shift-and-sum.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from ..errors import ArgumentError

SUPPORTED_BITS = (1, 2, 4, 8)


def packed_len(n: int, bits: int) -> int:
    """int32 words holding n codes of `bits` bits."""
    return -(-n * bits // 32)


def packed_shape(rows: int, cols: int, bits: int) -> tuple[int, int]:
    """Shape of the int32 words of [rows, cols] codes packed along the columns (compressed-tensors' weight_packed)."""
    return (rows, packed_len(cols, bits))


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ArgumentError("bits", f"packing supports {SUPPORTED_BITS} bits, not {bits}")


def bytes_to_words(b: torch.Tensor) -> torch.Tensor:
    """[rows, 4k] uint8 (little-endian word bytes) -> [rows, k] int32."""
    b = b.contiguous()
    if b.device.type == "cpu" and sys.byteorder == "big":
        b = b.view(b.shape[0], -1, 4).flip(-1).reshape(b.shape[0], -1)
    # through 1-D: a [1, n] or [n, 1] tensor may be "contiguous" with strides view() rejects
    return b.reshape(-1).view(torch.int32).view(b.shape[0], -1)


def words_to_bytes(w: torch.Tensor) -> torch.Tensor:
    """[rows, k] int32 -> [rows, 4k] uint8, each word's bytes little-endian (a view where the host is)."""
    b = w.contiguous().reshape(-1).view(torch.uint8).view(w.shape[0], -1)
    if w.device.type == "cpu" and sys.byteorder == "big":
        b = b.view(b.shape[0], -1, 4).flip(-1).reshape(b.shape[0], -1)
    return b


def _pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 1 of a 2-D int8 tensor."""
    rows, cols = q.shape
    per_word = 32 // bits
    pad = (-cols) % per_word
    if bits in (4, 8):
        u = q.contiguous().view(torch.uint8)
        # (q + 2^(b-1)) mod 2^b == (q mod 2^b) xor 2^(b-1)
        u = (u & 0xF) ^ 0x8 if bits == 4 else u ^ 0x80
        if pad:
            u = F.pad(u, (0, pad))
        if bits == 4:
            u = u[:, 0::2] | (u[:, 1::2] << 4)
        return bytes_to_words(u)
    u = q.to(torch.int64) + (1 << (bits - 1))
    if pad:
        u = F.pad(u, (0, pad))
    shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * bits
    words = (u.view(rows, -1, per_word) << shifts).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement, no overflow
    return words.to(torch.int32)


def _unpack_rows(p: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    rows = p.shape[0]
    if bits == 8:  # one code per byte: xor 0x80 turns q + 128 back into q as a two's-complement byte
        return (words_to_bytes(p)[:, :cols] ^ 0x80).view(torch.int8)
    if bits == 4:
        b = words_to_bytes(p)
        u = torch.empty((rows, b.shape[1] * 2), dtype=torch.uint8, device=p.device)
        u[:, 0::2] = b & 0xF
        u[:, 1::2] = b >> 4
        return u[:, :cols].view(torch.int8).sub(8)
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=p.device, dtype=torch.int64) * bits
    u = (p.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return (u.reshape(rows, -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack int8 codes in [-2^(b-1), 2^(b-1)-1] of a 2-D tensor along `dim` into int32 (CT layout)."""
    _check_bits(bits)
    if q.dtype != torch.int8:
        raise ArgumentError("q", f"codes must be int8 before packing, got {q.dtype}")
    if q.ndim != 2 or dim not in (0, 1):
        raise ArgumentError("q", "pack_int32 takes a 2-D tensor and dim 0 or 1")
    if dim == 0:
        return _pack_rows(q.t(), bits).t().contiguous()
    return _pack_rows(q, bits)


def unpack_int32(packed: torch.Tensor, bits: int, shape, dim: int = 1) -> torch.Tensor:
    """Reverse pack_int32: int32 words -> int8 codes of the 2-D `shape` (a tuple, Size or int tensor)."""
    _check_bits(bits)
    if packed.dtype != torch.int32:
        raise ArgumentError("packed", f"packed codes must be int32, got {packed.dtype}")
    shape = [int(s) for s in shape]
    if packed.ndim != 2 or len(shape) != 2 or dim not in (0, 1):
        raise ArgumentError("packed", "unpack_int32 takes a 2-D tensor, a 2-D shape and dim 0 or 1")
    n = shape[dim]
    other = shape[1 - dim]
    p = packed.t() if dim == 0 else packed
    if p.shape[0] != other or p.shape[1] != packed_len(n, bits):
        raise ArgumentError(
            "packed",
            f"packed shape {tuple(packed.shape)} does not match {bits}-bit codes of shape {tuple(shape)}"
        )
    out = _unpack_rows(p, bits, n)
    return out.t().contiguous() if dim == 0 else out
