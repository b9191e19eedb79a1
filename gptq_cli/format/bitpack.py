"""Bit packing for the GPTQ checkpoint format (SPEC §2).

Values of b bits are laid out as one little-endian bit stream cut into int32 words: value j of a
chunk starts at bit b*j. For 2/4/8 bits a word holds 32/b whole values; for 3 bits 32 values fill 3
words and two values straddle word boundaries -- exactly the 10|1|10|1|10 split AutoGPTQ and
GPTQModel write.

qweight packs codes along K (the input dimension, rows of the [K, N] code matrix); qzeros packs zero
points along N. Lengths that do not fill a whole chunk are zero-padded; unpack takes the true
length.
"""

from __future__ import annotations

import math

import torch

from gptq_cli.format.config import check_bits


def _chunk(bits: int) -> tuple[int, int]:
    """(values per chunk, int32 words per chunk): the smallest run of values that fills whole
    words."""
    check_bits(bits)
    values = 32 // math.gcd(bits, 32)
    return values, values * bits // 32


def packed_len(length: int, bits: int) -> int:
    """Number of int32 words that hold `length` values of `bits` bits."""
    values, words = _chunk(bits)
    return -(-length // values) * words


def pack_last(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) along the last dimension into int32 words."""
    per_chunk, words_per_chunk = _chunk(bits)
    v = values.to(torch.int64)  # exact integer ops on any device: the engine packs where it solved
    if v.numel() and bool(((v < 0) | (v >= 1 << bits)).any()):  # one device sync, not two
        raise ValueError(
            f"codes out of range for {bits}-bit packing: [{int(v.min())}, {int(v.max())}]"
        )
    length = v.shape[-1]
    pad = (-length) % per_chunk
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.reshape(*v.shape[:-1], -1, per_chunk)
    out = torch.zeros(*v.shape[:-1], words_per_chunk, dtype=torch.int64, device=v.device)
    for j in range(per_chunk):
        word, shift = divmod(bits * j, 32)
        out[..., word] |= (v[..., j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the value straddles into the next word (3-bit only)
            out[..., word + 1] |= v[..., j] >> (32 - shift)
    out = out.reshape(*out.shape[:-2], -1)
    out = out - ((out >> 31) << 32)  # reinterpret the unsigned 32-bit pattern as signed
    return out.to(torch.int32)


def unpack_last(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of pack_last: int32 words -> int32 codes, the last dimension trimmed to `length`."""
    per_chunk, words_per_chunk = _chunk(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed tensors must be int32, got {packed.dtype}")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(*w.shape[:-1], -1, words_per_chunk)
    mask = (1 << bits) - 1
    cols = []
    for j in range(per_chunk):
        word, shift = divmod(bits * j, 32)
        v = (w[..., word] >> shift) & mask
        if shift + bits > 32:
            v |= (w[..., word + 1] << (32 - shift)) & mask
        cols.append(v)
    out = torch.stack(cols, dim=-1).reshape(*w.shape[:-2], -1)
    if out.shape[-1] < length:
        raise ValueError(f"packed tensor holds {out.shape[-1]} values, {length} requested")
    return out[..., :length].to(torch.int32)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [K, N] -> qweight [packed_len(K), N], packed along K."""
    return pack_last(codes.t(), bits).t().contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight [packed_len(K), N] -> codes [K, N]."""
    return unpack_last(qweight.t(), bits, in_features).t().contiguous()


def pack_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """True zero points [G, N] -> qzeros [G, packed_len(N)]; format "gptq" (v1) stores zero - 1."""
    stored = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        if stored.numel() and int(stored.min()) < 1:
            raise ValueError(
                "a zero point of 0 cannot be stored in format 'gptq' (v1 stores zero-1); "
                "use checkpoint_format 'gptq_v2'"
            )
        stored = stored - 1
    elif checkpoint_format != "gptq_v2":
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}")
    return pack_last(stored, bits)


def unpack_qzeros(
    qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str = "gptq"
) -> torch.Tensor:
    """qzeros -> true zero points [G, N] (int32). v1 adds 1 back per value, as every v1 loader
    does."""
    zeros = unpack_last(qzeros, bits, out_features)
    if checkpoint_format == "gptq":
        return zeros + 1
    if checkpoint_format != "gptq_v2":
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}")
    return zeros
