"""Fixtures shared by the process-side tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from .fakesystemd import FakeManager


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[FakeManager]:
    """systemd's side of sd_notify, receiving for the whole test."""
    manager = FakeManager(tmp_path / "notify")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run)
        yield manager
        nursery.cancel_scope.cancel()
    manager.close()
