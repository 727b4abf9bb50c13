"""``claim`` in the vector table: exclusive, out of the epoll set, taken back whole."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence

import pytest

from irqd.device.base import IrqIndex
from irqd.device.sim import SimDevice
from irqd.errors import IrqdError
from irqd.eventfd import is_eventfd
from irqd.hotpath.dispatcher import Dispatcher
from irqd.hotpath.python import PythonHotLoop
from irqd.server.vectors import VectorTable

MSIX = IrqIndex.MSIX


#: Subscriber ids, as sessions have.
_IDS = itertools.count(1)


class Recorder:
    def __init__(self) -> None:
        self.id = next(_IDS)
        self.counts: dict[int, int] = {}
        self.resized: list[list[int]] = []

    def add_pending(self, index: IrqIndex, vector: int, count: int) -> None:
        self.counts[vector] = self.counts.get(vector, 0) + count

    def post_resized(self, index: IrqIndex, vectors: Sequence[int], possible_loss: bool) -> None:
        self.resized.append(list(vectors))


@pytest.fixture
def rig() -> Iterator[tuple[SimDevice, VectorTable, Dispatcher]]:
    sim = SimDevice(msix_vectors=8)
    hot = PythonHotLoop()
    table = VectorTable(sim, hot)
    try:
        yield sim, table, hot.dispatcher
    finally:
        table.close()
        hot.close()
        sim.close()


def masked(sim: SimDevice) -> bool:
    return sim.intx_masked


def pump(table: VectorTable, dispatcher: Dispatcher) -> None:
    for token, count in dispatcher.drain().counts:
        table.deliver(token, count)


def test_claim_enables_hands_out_a_dup_and_stops_polling(
    rig: tuple[SimDevice, VectorTable, Dispatcher],
) -> None:
    sim, table, dispatcher = rig
    owner = Recorder()
    fd = table.claim(owner, MSIX, 3)
    try:
        assert is_eventfd(fd)
        vector = table.lookup(MSIX, 3)
        assert vector is not None
        assert fd != vector.eventfd.fileno()
        assert vector.eventfd.fileno() not in dispatcher
        assert table.claimed(MSIX) == [3]
        assert table.device_info()["msix"]["claimed"] == [3]
        sim.raise_irq(MSIX, 3, 5)
        pump(table, dispatcher)
        assert owner.counts == {}  # the daemon does not read it...
        assert os.eventfd_read(fd) == 5  # ...the claimer does
    finally:
        os.close(fd)


def test_claim_is_exclusive_both_ways(rig: tuple[SimDevice, VectorTable, Dispatcher]) -> None:
    _sim, table, _ = rig
    a, b = Recorder(), Recorder()
    table.subscribe(a, MSIX, [1])
    with pytest.raises(IrqdError) as info:
        table.claim(b, MSIX, 1)
    assert info.value.code == "EBUSY"
    fd = table.claim(b, MSIX, 2)
    try:
        for attempt in (
            lambda: table.subscribe(a, MSIX, [0, 2]),
            lambda: table.claim(a, MSIX, 2),
            lambda: table.claim(b, MSIX, 2),
        ):
            with pytest.raises(IrqdError) as info:
                attempt()
            assert info.value.code == "EBUSY"
        # all or nothing: vector 0 was not enabled by the refused subscribe
        assert table.lookup(MSIX, 0) is None
        with pytest.raises(IrqdError) as info:
            table.unsubscribe(b, MSIX, [2])
        assert info.value.code == "EINVAL"
        with pytest.raises(IrqdError) as info:
            table.unclaim(a, MSIX, 2)
        assert info.value.code == "EINVAL"
    finally:
        os.close(fd)


def test_a_subscriber_that_claims_gets_its_counts_up_to_the_claim(
    rig: tuple[SimDevice, VectorTable, Dispatcher],
) -> None:
    sim, table, dispatcher = rig
    owner = Recorder()
    table.subscribe(owner, MSIX, [4])
    sim.raise_irq(MSIX, 4, 2)  # not yet read by the dispatcher
    fd = table.claim(owner, MSIX, 4)
    try:
        assert owner.counts == {4: 2}
        assert table.subscriptions(owner) == []
        sim.raise_irq(MSIX, 4, 1)
        pump(table, dispatcher)
        assert owner.counts == {4: 2}
        assert os.eventfd_read(fd) == 1
    finally:
        os.close(fd)


def test_unclaim_and_drop_release_the_vector_and_leave_its_count_to_the_claimer(
    rig: tuple[SimDevice, VectorTable, Dispatcher],
) -> None:
    sim, table, dispatcher = rig
    owner, other = Recorder(), Recorder()
    fd = table.claim(owner, MSIX, 5)
    fd2 = table.claim(owner, MSIX, 6)
    try:
        sim.raise_irq(MSIX, 5, 3)
        table.unclaim(owner, MSIX, 5)
        assert table.lookup(MSIX, 5) is None
        assert sim.assigned_fd(MSIX, 5) is None
        assert os.eventfd_read(fd) == 3  # nobody else read it
        table.drop(owner)
        assert table.enabled(MSIX) == []
        assert len(dispatcher) == 0
        # Free for anyone now, with a new eventfd.
        table.subscribe(other, MSIX, [5, 6])
        sim.raise_irq(MSIX, 6, 1)
        pump(table, dispatcher)
        assert other.counts == {6: 1}
    finally:
        os.close(fd)
        os.close(fd2)


def test_a_claimed_vector_survives_a_grow_and_its_claimer_is_told() -> None:
    sim = SimDevice(msix_vectors=8, noresize=True)
    hot = PythonHotLoop()
    table = VectorTable(sim, hot, msix_prearm=2)
    owner, other = Recorder(), Recorder()
    try:
        fd = table.claim(owner, MSIX, 1)
        try:
            table.subscribe(other, MSIX, [6])  # beyond the armed range: grow
            assert owner.resized == [[1]]
            # the loopback trigger after the grow reaches the claimer's fd
            assert os.eventfd_read(fd) == 1
            sim.raise_irq(MSIX, 1, 2)
            assert os.eventfd_read(fd) == 2
        finally:
            os.close(fd)
    finally:
        table.close()
        hot.close()
        sim.close()


def test_claim_checks_the_range(rig: tuple[SimDevice, VectorTable, Dispatcher]) -> None:
    _sim, table, _ = rig
    with pytest.raises(IrqdError) as info:
        table.claim(Recorder(), MSIX, 8)
    assert info.value.code == "EINVAL"


def test_intx_claimer_may_unmask(rig: tuple[SimDevice, VectorTable, Dispatcher]) -> None:
    sim, table, _ = rig
    owner = Recorder()
    fd = table.claim(owner, IrqIndex.INTX, 0)
    try:
        sim.set_intx_line(True)
        assert os.eventfd_read(fd) == 1
        assert masked(sim)
        sim.set_intx_line(False)
        table.unmask(owner, IrqIndex.INTX)
        assert not masked(sim)
        with pytest.raises(IrqdError):
            table.unmask(Recorder(), IrqIndex.INTX)
    finally:
        os.close(fd)
