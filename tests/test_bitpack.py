"""Bit-packed integer codes: exact round trips, minimal sizes, refusal of codes that do not fit."""

from __future__ import annotations

import math

import pytest
import torch

from pfl_mpi.algorithms.bitpack import bits_for, pack_codes, packed_bytes, unpack_codes


@pytest.mark.parametrize("count,bits", [(1, 1), (2, 1), (3, 2), (17, 5), (33, 6), (4810, 13), (65536, 16)])
def test_bits_for(count, bits):
    assert bits_for(count) == bits
    assert 2**bits >= count


@pytest.mark.parametrize("bits", [1, 3, 6, 8, 13, 20])
def test_round_trip_takes_the_minimal_bytes(bits):
    codes = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    data = pack_codes(codes, bits)
    assert data.dtype == torch.uint8 and data.numel() == math.ceil(1001 * bits / 8) == packed_bytes(1001, bits)
    assert torch.equal(unpack_codes(data, bits, 1001), codes)


def test_the_bit_order_is_most_significant_first():
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b01101100]


def test_codes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_codes(torch.tensor([8]), 3)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([-1]), 3)
