"""Bit packing (SPEC §2) against hand-computed words and plain-Python transcriptions of the
reference loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptq_cli.format.bitpack import (
    pack_last,
    pack_qweight,
    pack_qzeros,
    packed_len,
    unpack_qweight,
    unpack_qzeros,
)
from gptq_cli.format.quantized import QuantizedWeight

BITS = (2, 3, 4, 8)


def u32(t: torch.Tensor) -> list:
    """int32 words as the unsigned 32-bit patterns they hold."""
    return (
        [[v & 0xFFFFFFFF for v in row] for row in t.tolist()]
        if t.dim() == 2
        else [v & 0xFFFFFFFF for v in t.tolist()]
    )


def random_ints(shape: tuple[int, ...], low: int, high: int, seed: int) -> torch.Tensor:
    return torch.randint(
        low, high, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int32
    )


@settings(max_examples=80, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    k=st.integers(1, 300),
    n=st.integers(1, 40),
    group_size=st.sampled_from([-1, 7, 32, 50, 64, 128]),
    fmt=st.sampled_from(["gptq", "gptq_v2"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_unpack_inverts_pack_for_any_shape(bits, k, n, group_size, fmt, seed):
    maxq = (1 << bits) - 1
    groups = math.ceil(k / (k if group_size == -1 else group_size))
    codes = random_ints((n, k), 0, maxq + 1, seed)
    # v1 cannot hold zero 0
    zeros = random_ints((groups, n), 1 if fmt == "gptq" else 0, maxq + 1, seed + 1)
    qw = QuantizedWeight(
        codes,
        torch.ones(groups, n, dtype=torch.float16),
        zeros,
        torch.zeros(k, dtype=torch.int32),
        bits,
        group_size,
    )
    t = qw.to_tensors(fmt)
    # 2/4/8 bits: 32/b whole values per word; 3 bits: 32 values fill 3 words, so rows come in threes
    assert t["qweight"].shape == (
        math.ceil(k / 32) * 3 if bits == 3 else math.ceil(k * bits / 32),
        n,
    )
    assert t["qzeros"].shape == (
        groups,
        math.ceil(n / 32) * 3 if bits == 3 else math.ceil(n * bits / 32),
    )
    assert t["qweight"].dtype == t["qzeros"].dtype == torch.int32
    assert torch.equal(unpack_qweight(t["qweight"], bits, k), codes.t())
    assert torch.equal(unpack_qzeros(t["qzeros"], bits, n, fmt), zeros)


def test_worked_example_packs_lowest_bits_first():
    codes = torch.tensor([3, 10, 0, 15, 7, 1, 12, 5])
    assert u32(pack_last(codes, 4)) == [0x5C17F0A3]
    # along K in qweight: the same eight codes down one column make the same word
    assert u32(pack_qweight(codes[:, None], 4)) == [[0x5C17F0A3]]


@pytest.mark.parametrize(
    "bits,v1_word,v2_word",
    [(4, 0x77777777, 0x88888888), (2, 0x55555555, 0xAAAAAAAA), (8, 0x7F7F7F7F, 0x80808080)],
)
def test_symmetric_zeros_words(bits, v1_word, v2_word):
    # symmetric zero 2^(b-1) everywhere
    zeros = torch.full((3, 64), 1 << (bits - 1), dtype=torch.int32)
    assert {w for row in u32(pack_qzeros(zeros, bits, "gptq")) for w in row} == {v1_word}
    assert {w for row in u32(pack_qzeros(zeros, bits, "gptq_v2")) for w in row} == {v2_word}


def spec_pack_2_4_8(q: list[list[int]], bits: int) -> list[list[int]]:
    """SPEC §2 literally: qweight[k // (32/b), n] |= q[k, n] << (b * (k mod 32/b)), on Python
    ints."""
    per_word = 32 // bits
    k_len, n_len = len(q), len(q[0])
    out = [[0] * n_len for _ in range(-(-k_len // per_word))]
    for k in range(k_len):
        for n in range(n_len):
            out[k // per_word][n] |= q[k][n] << (bits * (k % per_word))
    return out


def autogptq_pack_3bit(q: list[list[int]]) -> list[list[int]]:
    """AutoGPTQ's / GPTQModel's 3-bit qweight loop (10 values | 1 split | 10 | 1 split | 10),
    transcribed."""
    rows = len(q) // 32 * 3
    n_len = len(q[0])
    out = [[0] * n_len for _ in range(rows)]
    for n in range(n_len):
        i = row = 0
        while row < rows:
            for j in range(i, i + 10):
                out[row][n] |= q[j][n] << (3 * (j - i))
            i += 10
            out[row][n] |= q[i][n] << 30
            row += 1
            out[row][n] |= (q[i][n] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                out[row][n] |= q[j][n] << (3 * (j - i) + 1)
            i += 10
            out[row][n] |= q[i][n] << 31
            row += 1
            out[row][n] |= (q[i][n] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                out[row][n] |= q[j][n] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return [[v & 0xFFFFFFFF for v in r] for r in out]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_2_4_8_bit_layout_matches_spec_formula(bits):
    # K=40: a partial last word for every width
    codes = random_ints((40, 5), 0, 1 << bits, seed=bits)
    assert u32(pack_qweight(codes, bits)) == spec_pack_2_4_8(codes.tolist(), bits)


def test_3bit_layout_matches_autogptq_loop():
    codes = random_ints((96, 7), 0, 8, seed=3)
    assert u32(pack_qweight(codes, 3)) == autogptq_pack_3bit(codes.tolist())
    # qzeros use the same loop along N (columns): transpose in, transpose out
    zeros = random_ints((4, 64), 1, 8, seed=4)
    expected_v1 = autogptq_pack_3bit((zeros - 1).t().tolist())
    assert u32(pack_qzeros(zeros, 3, "gptq").t()) == expected_v1


def test_packed_len_is_whole_chunks():
    assert [packed_len(k, 4) for k in (1, 8, 9, 256)] == [1, 1, 2, 32]
    assert [packed_len(k, 3) for k in (1, 32, 33, 256)] == [3, 3, 6, 24]


def test_pack_rejects_out_of_range_codes_and_v1_zero_of_zero():
    with pytest.raises(ValueError, match="out of range"):
        pack_qweight(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="gptq_v2"):
        pack_qzeros(torch.tensor([[0, 3]]), 4, "gptq")
