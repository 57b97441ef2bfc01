"""Fixed-width integer codes packed into bytes: the wire format of compressed payloads.

A code in ``0 .. count - 1`` needs ``bits_for(count)`` bits; ``n`` codes take ``ceil(n * bits / 8)``
bytes, most significant bit first, with no per-code padding. Top-k sends its indices this way
(``bits_for(d)`` bits each instead of 32) and QSGD its signed levels (``bits_for(2 s + 1)`` bits each).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def bits_for(count: int) -> int:
    """Bits that hold every code ``0 .. count - 1`` (at least 1)."""
    if count < 1:
        raise ValueError(f"need at least one code, got {count}")
    return max(1, math.ceil(math.log2(count)))


def packed_bytes(n: int, bits: int) -> int:
    """Bytes of ``n`` codes of ``bits`` bits."""
    return math.ceil(n * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` (integers in ``[0, 2**bits)``) as ``packed_bytes(len, bits)`` uint8."""
    values = codes.detach().cpu().reshape(-1).numpy().astype(np.int64)
    if values.size and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to fit {bits} bits")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    matrix = ((values[:, None] >> shifts) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(matrix.reshape(-1)))


def unpack_codes(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The ``n`` codes (int64) packed by ``pack_codes`` in the uint8 ``data``."""
    raw = np.unpackbits(data.detach().cpu().numpy().astype(np.uint8, copy=False))[: n * bits]
    weights = np.left_shift(1, np.arange(bits - 1, -1, -1, dtype=np.int64))
    return torch.from_numpy(raw.reshape(n, bits).astype(np.int64) @ weights)
