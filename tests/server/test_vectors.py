"""The vector table on SimDevice: strategies, exact attribution, rollback, conflicts."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irqd.config import MsixStrategy
from irqd.device.base import (
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    IrqIndex,
)
from irqd.device.sim import SimDevice
from irqd.errors import ConfigError, IrqdError
from irqd.hotpath.dispatcher import Dispatcher
from irqd.hotpath.python import PythonHotLoop
from irqd.server.vectors import VectorTable

MSIX = IrqIndex.MSIX
ASSIGN = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER
NONE_TRIGGER = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER


#: Subscriber ids, as sessions have.
_IDS = itertools.count(1)


class Recorder:
    """A subscriber that records what the table credits it with."""

    def __init__(self, name: str) -> None:
        self.id = next(_IDS)
        self.name = name
        self.counts: dict[tuple[IrqIndex, int], int] = {}
        self.resized: list[tuple[IrqIndex, list[int], bool]] = []

    def add_pending(self, index: IrqIndex, vector: int, count: int) -> None:
        key = (index, vector)
        self.counts[key] = self.counts.get(key, 0) + count

    def post_resized(self, index: IrqIndex, vectors: Sequence[int], possible_loss: bool) -> None:
        self.resized.append((index, list(vectors), possible_loss))

    def count(self, vector: int, index: IrqIndex = MSIX) -> int:
        return self.counts.get((index, vector), 0)


class Rig:
    def __init__(self, sim: SimDevice, table: VectorTable, dispatcher: Dispatcher) -> None:
        self.sim = sim
        self.table = table
        self.dispatcher = dispatcher

    def pump(self) -> None:
        """One dispatcher round, as the daemon's loop does it."""
        result = self.dispatcher.drain()
        for token, count in result.counts:
            self.table.deliver(token, count)

    def calls(self) -> list[tuple[int, int, int, int, list[int] | None]]:
        """The set_irqs calls made so far, fds shown as 'fd' (>= 0) or -1."""
        out = []
        for call in self.sim.calls:
            data = None
            if call.data is not None:
                data = [-1 if int(x) < 0 else 1 for x in call.data]
            out.append((call.flags, call.index, call.start, call.count, data))
        return out


def make_rig(
    *,
    noresize: bool,
    strategy: MsixStrategy = MsixStrategy.AUTO,
    prearm: int | None = None,
    vectors: int = 8,
    host_vector_limit: int | None = None,
) -> Iterator[Rig]:
    sim = SimDevice(msix_vectors=vectors, noresize=noresize, host_vector_limit=host_vector_limit)
    hot = PythonHotLoop()
    table = VectorTable(sim, hot, msix_strategy=strategy, msix_prearm=prearm)
    try:
        yield Rig(sim, table, hot.dispatcher)
    finally:
        table.close()
        hot.close()
        sim.close()


@pytest.fixture
def dynamic() -> Iterator[Rig]:
    yield from make_rig(noresize=False)


@pytest.fixture
def noresize() -> Iterator[Rig]:
    yield from make_rig(noresize=True, prearm=2)


def test_auto_picks_dynamic_when_noresize_is_clear(dynamic: Rig) -> None:
    assert dynamic.table.msix_strategy is MsixStrategy.DYNAMIC


def test_auto_picks_prearm_when_noresize_is_set(noresize: Rig) -> None:
    assert noresize.table.msix_strategy is MsixStrategy.PREARM


def test_dynamic_enables_with_one_empty_vector_then_adds_one_at_a_time(dynamic: Rig) -> None:
    a = Recorder("a")
    outcome = dynamic.table.subscribe(a, MSIX, [3])
    assert outcome.how == "dynamic"
    assert outcome.enabled == (3,)
    outcome = dynamic.table.subscribe(a, MSIX, [5])
    assert dynamic.calls() == [
        (ASSIGN, MSIX, 0, 1, [-1]),
        (ASSIGN, MSIX, 3, 1, [1]),
        (ASSIGN, MSIX, 5, 1, [1]),
    ]
    # vector 0 from the enabling call, then 3 and 5 allocated one by one
    assert dynamic.table.host_vectors()["msix"] == 3
    assert dynamic.sim.host_vectors(MSIX) == 3


def test_prearm_arms_the_range_once_and_assigns_inside_it(noresize: Rig) -> None:
    a = Recorder("a")
    assert noresize.table.subscribe(a, MSIX, [1]).how == "prearm"
    assert noresize.table.subscribe(a, MSIX, [0]).how == "prearm"
    assert noresize.calls() == [
        (ASSIGN, MSIX, 0, 2, [-1, -1]),
        (ASSIGN, MSIX, 1, 1, [1]),
        (ASSIGN, MSIX, 0, 1, [1]),
    ]
    assert not a.resized


def test_grow_beyond_the_armed_range_keeps_eventfds_and_warns_subscribers(noresize: Rig) -> None:
    a, b = Recorder("a"), Recorder("b")
    noresize.table.subscribe(a, MSIX, [0])
    fd_before = noresize.sim.assigned_fd(MSIX, 0)
    assert fd_before is not None
    noresize.sim.raise_irq(MSIX, 0)
    outcome = noresize.table.subscribe(b, MSIX, [5])
    assert outcome.how == "resize"
    assert noresize.calls()[2:] == [
        (NONE_TRIGGER, MSIX, 0, 0, None),
        (ASSIGN, MSIX, 0, 6, [1, -1, -1, -1, -1, 1]),
        (NONE_TRIGGER, MSIX, 0, 1, None),
    ]
    assert a.resized == [(MSIX, [0], True)]
    assert b.resized == []
    noresize.pump()
    # The interrupt raised before the resize plus the loopback trigger after it.
    assert a.count(0) == 2
    assert b.count(5) == 0
    assert noresize.table.host_vectors()["msix"] == 6


def test_grow_strategy_enables_only_what_is_needed() -> None:
    for rig in make_rig(noresize=True, strategy=MsixStrategy.GROW):
        a = Recorder("a")
        assert rig.table.subscribe(a, MSIX, [2]).how == "resize"
        assert rig.calls()[0] == (ASSIGN, MSIX, 0, 3, [-1, -1, -1])
        assert rig.table.host_vectors()["msix"] == 3


def test_dynamic_strategy_refused_on_a_noresize_device() -> None:
    with pytest.raises(ConfigError, match="NORESIZE"):
        next(make_rig(noresize=True, strategy=MsixStrategy.DYNAMIC))


def test_prearm_size_is_validated() -> None:
    with pytest.raises(ConfigError, match="msix-prearm"):
        next(make_rig(noresize=True, prearm=9))


def test_counts_before_a_subscribe_go_to_the_earlier_subscribers(dynamic: Rig) -> None:
    a, b = Recorder("a"), Recorder("b")
    dynamic.table.subscribe(a, MSIX, [0])
    dynamic.sim.raise_irq(MSIX, 0, 3)
    dynamic.table.subscribe(b, MSIX, [0])
    dynamic.sim.raise_irq(MSIX, 0, 2)
    dynamic.pump()
    assert (a.count(0), b.count(0)) == (5, 2)
    dynamic.sim.raise_irq(MSIX, 0, 4)
    dynamic.table.unsubscribe(a, MSIX, [0])
    dynamic.sim.raise_irq(MSIX, 0, 1)
    dynamic.pump()
    assert (a.count(0), b.count(0)) == (9, 7)
    assert dynamic.table.lookup(MSIX, 0) is not None


def test_last_unsubscribe_deassigns_and_closes(dynamic: Rig) -> None:
    a = Recorder("a")
    dynamic.table.subscribe(a, MSIX, [4])
    vector = dynamic.table.lookup(MSIX, 4)
    assert vector is not None
    dynamic.table.unsubscribe(a, MSIX, [4])
    assert dynamic.calls()[-1] == (ASSIGN, MSIX, 4, 1, [-1])
    assert dynamic.sim.assigned_fd(MSIX, 4) is None
    assert vector.eventfd.closed
    assert dynamic.table.lookup(MSIX, 4) is None
    # de-assigning keeps the host vector until MSI-X is disabled
    assert dynamic.table.host_vectors()["msix"] == 2


def test_a_vector_whose_eventfd_the_poller_dropped_can_still_be_left_and_claimed(
    dynamic: Rig,
) -> None:
    """The dispatcher drops an eventfd that hangs up or reads short (and says so
    once); the table must still let its subscribers go and its vector be claimed."""
    a = Recorder("a")
    dynamic.table.subscribe(a, MSIX, [1, 2])
    for number in (1, 2):
        vector = dynamic.table.lookup(MSIX, number)
        assert vector is not None
        dynamic.dispatcher.remove(vector.eventfd.fileno())  # as drain() does with a failed fd
    dynamic.table.unsubscribe(a, MSIX, [1])
    assert dynamic.table.lookup(MSIX, 1) is None
    os.close(dynamic.table.claim(a, MSIX, 2))  # its subscription ends with the claim...
    assert dynamic.table.claimed(MSIX) == [2]
    dynamic.table.drop(a)  # ...and the claim ends here
    assert dynamic.table.vectors() == []


def test_unsubscribe_of_something_not_subscribed_changes_nothing(dynamic: Rig) -> None:
    a, b = Recorder("a"), Recorder("b")
    dynamic.table.subscribe(a, MSIX, [0, 1])
    with pytest.raises(IrqdError) as info:
        dynamic.table.unsubscribe(b, MSIX, [0])
    assert info.value.code == "EINVAL"
    with pytest.raises(IrqdError):
        dynamic.table.unsubscribe(a, MSIX, [0, 2])
    assert dynamic.table.subscriptions(a) == [(MSIX, 0), (MSIX, 1)]


def test_failed_multi_vector_subscribe_rolls_back() -> None:
    # Host room for vector 0 (the enabling call) and two more.
    for rig in make_rig(noresize=False, host_vector_limit=3):
        a = Recorder("a")
        rig.table.subscribe(a, MSIX, [1])
        before = rig.table.enabled(MSIX)
        with pytest.raises(IrqdError) as info:
            rig.table.subscribe(a, MSIX, [2, 3, 4])
        assert info.value.code == "ENOSPC"
        assert rig.table.enabled(MSIX) == before
        assert rig.table.subscriptions(a) == [(MSIX, 1)]
        assert rig.sim.assigned_fd(MSIX, 2) is None
        assert rig.sim.assigned_fd(MSIX, 1) is not None
        # the vector that was live before still delivers
        rig.sim.raise_irq(MSIX, 1)
        rig.pump()
        assert a.count(1) == 1


def test_out_of_range_vector_is_refused_before_anything_changes(dynamic: Rig) -> None:
    a = Recorder("a")
    with pytest.raises(IrqdError, match="out of range") as info:
        dynamic.table.subscribe(a, MSIX, [1, 8])
    assert info.value.code == "EINVAL"
    assert dynamic.sim.calls == []


def test_intx_has_one_subscriber_at_a_time(dynamic: Rig) -> None:
    a, b = Recorder("a"), Recorder("b")
    dynamic.table.subscribe(a, IrqIndex.INTX, [0])
    with pytest.raises(IrqdError) as info:
        dynamic.table.subscribe(b, IrqIndex.INTX, [0])
    assert info.value.code == "EBUSY"
    dynamic.sim.set_intx_line(True)
    dynamic.pump()
    assert a.count(0, IrqIndex.INTX) == 1
    # masked until unmasked; the line is still asserted, so unmask re-signals
    dynamic.table.unmask(a, IrqIndex.INTX)
    dynamic.pump()
    assert a.count(0, IrqIndex.INTX) == 2
    with pytest.raises(IrqdError):
        dynamic.table.unmask(b, IrqIndex.INTX)


def test_enabling_another_index_is_refused_while_one_has_subscribers(dynamic: Rig) -> None:
    a = Recorder("a")
    dynamic.table.subscribe(a, MSIX, [0])
    with pytest.raises(IrqdError) as info:
        dynamic.table.subscribe(a, IrqIndex.MSI, [0])
    assert info.value.code == "EBUSY"
    dynamic.table.unsubscribe(a, MSIX, [0])
    # MSI-X is idle now: it is disabled to make room for MSI
    assert dynamic.table.subscribe(a, IrqIndex.MSI, [0]).enabled == (0,)
    assert not dynamic.table.is_active(MSIX)
    assert dynamic.sim.active_index() is IrqIndex.MSI


def test_trigger_is_a_real_loopback(dynamic: Rig) -> None:
    a = Recorder("a")
    dynamic.table.subscribe(a, MSIX, [2, 6])
    dynamic.table.trigger(MSIX, [6])
    dynamic.pump()
    assert (a.count(2), a.count(6)) == (0, 1)
    with pytest.raises(IrqdError):
        dynamic.table.trigger(MSIX, [3])


def test_drop_releases_everything_a_client_held(dynamic: Rig) -> None:
    a, b = Recorder("a"), Recorder("b")
    dynamic.table.subscribe(a, MSIX, [0, 1])
    dynamic.table.subscribe(b, MSIX, [1])
    dynamic.table.drop(a)
    assert dynamic.table.enabled(MSIX) == [1]
    assert dynamic.table.subscriptions(a) == []


def test_close_disables_the_device(dynamic: Rig) -> None:
    a = Recorder("a")
    dynamic.table.subscribe(a, MSIX, [0])
    dynamic.table.close()
    assert dynamic.sim.active_index() is None
    with pytest.raises(IrqdError) as info:
        dynamic.table.subscribe(a, MSIX, [1])
    assert info.value.code == "ENODEV"


def test_a_device_without_pcie_has_no_err_index() -> None:
    sim = SimDevice(msix_vectors=4, pcie=False)
    hot = PythonHotLoop()
    table = VectorTable(sim, hot)
    assert table.device_info()["err"]["count"] == 0
    table.close()
    hot.close()
    sim.close()


@pytest.mark.parametrize("index", [IrqIndex.ERR, IrqIndex.REQ])
def test_err_and_req_belong_to_the_daemon(dynamic: Rig, index: IrqIndex) -> None:
    a = Recorder("a")
    with pytest.raises(IrqdError, match="belongs to the daemon") as info:
        dynamic.table.subscribe(a, index, [0])
    assert info.value.code == "EINVAL"
    with pytest.raises(IrqdError, match="belongs to the daemon"):
        dynamic.table.claim(a, index, 0)
    assert dynamic.sim.calls == []


# -- the record packed again after every change (table_state.RecordPacker) ------------------


def record_as_described(table: VectorTable, ids: dict[int, int]) -> dict[str, Any]:
    """What the hand-over's state says of the table, read off its queries one by one."""
    return {
        "msix_strategy": str(table.msix_strategy),
        "msix_prearm": table.msix_prearm,
        "indexes": table.indexes.export_state(),
        "vectors": [
            [
                int(v.index),
                v.number,
                table.total_of(v),
                [ids.get(id(s), -1) for s in v.subscribers],
                None if v.claimed_by is None else ids.get(id(v.claimed_by), -1),
            ]
            for v in table.vectors()
        ],
    }


OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(
            ["subscribe", "unsubscribe", "claim", "unclaim", "fire", "drop", "forget", "renumber"]
        ),
        st.integers(0, 2),
        st.integers(0, 7),
    ),
    max_size=40,
)


@settings(max_examples=80, deadline=None)
@given(OPERATIONS)
def test_the_packed_record_follows_every_change(
    operations: list[tuple[str, int, int]],
) -> None:
    # What is kept packed between calls must never outlive a change: after each
    # step the bytes equal the record packed whole from the table's queries.
    with contextlib.contextmanager(make_rig)(noresize=False) as rig:
        table = rig.table
        clients = [Recorder(f"c{i}") for i in range(3)]
        ids = {id(c): c.id for c in clients}
        for operation, who, number in operations:
            client = clients[who]
            with contextlib.suppress(IrqdError):
                if operation == "subscribe":
                    table.subscribe(client, MSIX, [number])
                elif operation == "unsubscribe":
                    table.unsubscribe(client, MSIX, [number])
                elif operation == "claim":
                    os.close(table.claim(client, MSIX, number))
                elif operation == "unclaim":
                    table.unclaim(client, MSIX, number)
                elif operation == "fire":
                    rig.sim.raise_irq(MSIX, number, who + 1)
                    rig.pump()
                elif operation == "drop":
                    table.drop(client)
                elif operation == "forget":  # the session is no longer recorded
                    ids.pop(id(client), None)
                else:  # the same object under another id
                    ids[id(client)] = ids.get(id(client), client.id) + 100
            packed = table.packed_state(ids)
            expected = record_as_described(table, ids)
            assert msgpack.unpackb(packed, raw=False, strict_map_key=False) == expected
            assert packed == msgpack.packb(expected, use_bin_type=True)


def test_a_subscriber_the_next_process_does_not_get_is_minus_one(dynamic: Rig) -> None:
    a, b = Recorder("a"), Recorder("b")
    dynamic.table.subscribe(a, MSIX, [0, 2])
    dynamic.table.subscribe(b, MSIX, [2])
    dynamic.sim.raise_irq(MSIX, 2, 3)
    dynamic.pump()
    ids = {id(a): a.id}  # b is not among the sessions the next process gets
    state = msgpack.unpackb(dynamic.table.packed_state(ids), raw=False, strict_map_key=False)
    assert state == record_as_described(dynamic.table, ids)
    assert state["vectors"] == [
        [int(MSIX), 0, 0, [a.id], None],
        [int(MSIX), 2, 3, [a.id, -1], None],
    ]
