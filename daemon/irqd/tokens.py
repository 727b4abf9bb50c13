"""Poller tokens: the 32-bit name under which an eventfd is polled.

A token packs an IRQ index (high half) and a vector number (low half), so
that the poller hands back, with every count it reads, which vector it
belongs to, without a lookup table (``irqd._drain`` packs it beside the fd
in ``epoll_data.u64``; ``irqd._hotloop`` splits it the same way).
"""

from __future__ import annotations

from irqd.device.base import IrqIndex

__all__ = ["make_token", "split_token"]


def make_token(index: IrqIndex, vector: int) -> int:
    """The poller token for a vector: index in the high half, vector in the low."""
    return (int(index) << 16) | vector


def split_token(token: int) -> tuple[IrqIndex, int]:
    """Inverse of ``make_token``."""
    return IrqIndex(token >> 16), token & 0xFFFF
