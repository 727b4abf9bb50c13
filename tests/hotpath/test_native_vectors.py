"""irqd.hotpath.native.NativeHotLoop: the vector table's view of the native hot loop."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import pytest

from irqd.device.base import IrqIndex
from irqd.hotpath.native import NativeHotLoop
from irqd.tokens import make_token

#: Guards against a hang; nothing waits for a fixed time.
DEADLINE = 10


class Stranger:
    """A subscriber the native hot loop did not make: it has no output there."""

    id = 1

    def add_pending(self, index: IrqIndex, vector: int, count: int) -> None:
        """Never called: the thread credits its own sessions."""

    def post_resized(self, index: IrqIndex, vectors: Sequence[int], possible_loss: bool) -> None:
        """Never called here."""


def test_a_vector_the_thread_dropped_stays_known_as_failed() -> None:
    native = NativeHotLoop()
    r, w = os.pipe()  # not an eventfd: the thread drops it on its hang-up
    try:
        token = make_token(IrqIndex.MSIX, 3)
        native.add(r, token)
        assert r in native
        native.start()
        os.close(w)
        failed: list[int] = []
        deadline = time.monotonic() + DEADLINE
        while not failed:
            assert time.monotonic() < deadline, "the failed vector was never reported"
            assert native.responds(DEADLINE)
            failed = native.take_failed()
        assert failed == [token]
        assert r not in native
        # The table goes on treating it as a vector that never fires ...
        assert native.drain_fd(r) == 0
        assert native.total(r) == 0
        native.joined(token, Stranger())
        native.left(token, Stranger())
        # ... until it lets go of it, once.
        assert native.remove(r) == 0
        with pytest.raises(KeyError):
            native.remove(r)
        with pytest.raises(KeyError):
            native.drain_fd(r)
    finally:
        native.close()
        os.close(r)


def test_after_close_the_figures_stay_and_nothing_raises() -> None:
    native = NativeHotLoop()
    native.start()
    assert native.responds(DEADLINE)
    rounds = native.rounds
    latency = list(native.latency_counts())
    native.close()
    native.close()
    assert native.closed
    # What a watchdog tick, a stats request or a log line may still ask for.
    assert native.rounds == rounds
    assert list(native.latency_counts()) == latency
    assert native.take_failed() == []
    assert native.responds(0)
    native.stop()


def test_a_subscriber_the_native_loop_did_not_make_is_refused() -> None:
    native = NativeHotLoop()
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        token = make_token(IrqIndex.MSIX, 0)
        native.add(efd, token)
        with pytest.raises(TypeError, match="no output in the native hot loop"):
            native.joined(token, Stranger())
    finally:
        native.close()
        os.close(efd)
