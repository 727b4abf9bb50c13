"""The dispatcher against real eventfds, with the native drain and its Python twin."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing

from irqd.hotpath import dispatcher as dispatcher_module
from irqd.hotpath.dispatcher import Dispatcher, DrainResult


@pytest.fixture(params=[True, False], ids=["native", "python"])
def disp(request: pytest.FixtureRequest) -> Iterator[Dispatcher]:
    use_native: bool = request.param
    with Dispatcher(use_native=use_native, max_events=64) as d:
        assert d.native is use_native
        yield d


@pytest.fixture
def efd() -> Iterator[Callable[[], int]]:
    fds: list[int] = []

    def make() -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        os.close(fd)


def drained(d: Dispatcher) -> dict[int, int]:
    result = d.drain()
    assert not result.failed
    as_dict = dict(result.counts)
    assert len(as_dict) == len(result.counts)  # each token at most once a round
    return as_dict


def test_native_is_built() -> None:
    # `make venv` builds irqd._drain; the fallback must not hide a broken build.
    assert Dispatcher().native


def test_counts_exact_across_many_writes(disp: Dispatcher, efd: Callable[[], int]) -> None:
    a = efd()
    disp.add(a, 7)
    for _ in range(1000):
        os.eventfd_write(a, 1)
    os.eventfd_write(a, 2**40)
    assert drained(disp) == {7: 1000 + 2**40}
    assert drained(disp) == {}


def test_several_ready_in_one_drain(disp: Dispatcher, efd: Callable[[], int]) -> None:
    fds = [efd() for _ in range(10)]
    for i, fd in enumerate(fds):
        disp.add(fd, 2 << 16 | i)
    for i, fd in enumerate(fds):
        if i % 3:
            os.eventfd_write(fd, i)
    assert drained(disp) == {2 << 16 | i: i for i in range(10) if i % 3}
    assert disp.stats.rounds == 1
    assert disp.stats.events == 6


def test_written_after_drain_shows_in_next(disp: Dispatcher, efd: Callable[[], int]) -> None:
    a, b = efd(), efd()
    disp.add(a, 1)
    disp.add(b, 2)
    os.eventfd_write(a, 1)
    assert drained(disp) == {1: 1}
    os.eventfd_write(a, 3)
    os.eventfd_write(b, 5)
    assert drained(disp) == {1: 3, 2: 5}
    assert disp.stats.rounds == 2


def test_empty_drain_is_not_a_round(disp: Dispatcher, efd: Callable[[], int]) -> None:
    disp.add(efd(), 1)
    result = disp.drain()
    assert result == DrainResult()
    assert not result
    assert disp.stats.rounds == 0


def test_remove_then_close_leaves_no_stale_events(disp: Dispatcher, efd: Callable[[], int]) -> None:
    a = os.eventfd(0, os.EFD_NONBLOCK)
    kernel_ref = os.dup(a)  # the device keeps its own reference, as the kernel does
    try:
        disp.add(a, 1)
        os.eventfd_write(a, 1)
        disp.remove(a)
        os.close(a)
        os.eventfd_write(kernel_ref, 1)  # the "device" fires after we let go
        b = efd()  # likely reuses a's number
        disp.add(b, 2)
        assert drained(disp) == {}
        assert os.eventfd_read(kernel_ref) == 2  # nobody read it
    finally:
        os.close(kernel_ref)


def test_remove_unknown_fd_is_keyerror(disp: Dispatcher, efd: Callable[[], int]) -> None:
    with pytest.raises(KeyError):
        disp.remove(efd())


def test_add_twice_is_eexist_and_changes_nothing(disp: Dispatcher, efd: Callable[[], int]) -> None:
    a = efd()
    disp.add(a, 1)
    with pytest.raises(FileExistsError) as exc:
        disp.add(a, 2)
    assert exc.value.errno == errno.EEXIST
    os.eventfd_write(a, 1)
    assert drained(disp) == {1: 1}
    assert a in disp
    assert len(disp) == 1


@pytest.mark.parametrize("token", [0, 1, 0xFFFF, 2 << 16 | 5, 2**32 - 1])
def test_token_range(disp: Dispatcher, efd: Callable[[], int], token: int) -> None:
    a = efd()
    disp.add(a, token)
    os.eventfd_write(a, 1)
    assert drained(disp) == {token: 1}


@pytest.mark.parametrize("token", [-1, 2**32])
def test_token_out_of_range(disp: Dispatcher, efd: Callable[[], int], token: int) -> None:
    with pytest.raises(ValueError, match="token"):
        disp.add(efd(), token)
    assert len(disp) == 0


def test_pipe_hangup_is_failed_once_and_removed(disp: Dispatcher, efd: Callable[[], int]) -> None:
    r, w = os.pipe()
    a = efd()
    try:
        disp.add(r, 9)
        disp.add(a, 1)
        os.close(w)  # EPOLLHUP on the read end
        os.eventfd_write(a, 4)
        result = disp.drain()
        assert result.failed == [9]
        assert result.counts == [(1, 4)]
        assert r not in disp
        assert disp.drain() == DrainResult()  # reported once, then gone
        with pytest.raises(KeyError):
            disp.remove(r)
    finally:
        os.close(r)


def test_short_read_is_failed(disp: Dispatcher) -> None:
    # A socket with 3 bytes in it is readable but is no eventfd.
    s1, s2 = socket.socketpair()
    try:
        disp.add(s1.fileno(), 3)
        s2.send(b"abc")
        assert disp.drain().failed == [3]
        s2.send(b"abc")
        assert disp.drain() == DrainResult()
    finally:
        s1.close()
        s2.close()


def test_socket_peer_closed_is_failed(disp: Dispatcher) -> None:
    s1, s2 = socket.socketpair()
    try:
        disp.add(s1.fileno(), 5)
        s2.close()  # EPOLLIN with a 0-byte read, and EPOLLHUP
        assert disp.drain() == DrainResult(failed=[5])
    finally:
        s1.close()


def test_drain_fd(disp: Dispatcher, efd: Callable[[], int]) -> None:
    a, b = efd(), efd()
    disp.add(a, 1)
    disp.add(b, 2)
    assert disp.drain_fd(a) == 0
    os.eventfd_write(a, 6)
    os.eventfd_write(b, 1)
    assert disp.drain_fd(a) == 6
    assert drained(disp) == {2: 1}  # a's count was attributed once, by drain_fd
    with pytest.raises(KeyError):
        disp.drain_fd(efd())


def test_more_ready_than_max_events(efd: Callable[[], int], native: bool) -> None:
    with Dispatcher(max_events=4, use_native=native) as d:
        fds = [efd() for _ in range(10)]
        for i, fd in enumerate(fds):
            d.add(fd, i)
            os.eventfd_write(fd, i + 1)
        seen: dict[int, int] = {}
        sizes = []
        while result := d.drain():
            sizes.append(len(result.counts))
            seen.update(result.counts)
        assert sizes == [4, 4, 2]
        assert seen == {i: i + 1 for i in range(10)}


@pytest.fixture(params=[True, False], ids=["native", "python"])
def native(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    return value


def test_close_is_idempotent(native: bool) -> None:
    d = Dispatcher(use_native=native)
    epfd = d.fileno()
    d.close()
    d.close()
    assert d.closed
    with pytest.raises(ValueError, match="closed"):
        d.fileno()
    with pytest.raises(ValueError, match="closed"):
        d.drain()
    with pytest.raises(OSError):
        os.fstat(epfd)


def test_max_events_checked() -> None:
    for bad in (0, 65537):
        with pytest.raises(ValueError, match="max_events"):
            Dispatcher(max_events=bad)


def test_use_native_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatcher_module, "_native", None)
    with pytest.raises(ImportError):
        Dispatcher(use_native=True)
    with Dispatcher() as d:
        assert not d.native
        assert not d.stats.native


async def test_trio_waits_on_the_epoll_fd(disp: Dispatcher, efd: Callable[[], int]) -> None:
    fds = [efd() for _ in range(3)]
    for i, fd in enumerate(fds):
        disp.add(fd, i)
    got: dict[int, int] = {}

    async def loop(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while sum(got.values()) < 6:
            await trio.lowlevel.wait_readable(disp.fileno())
            for token, count in disp.drain().counts:
                got[token] = got.get(token, 0) + count

    async with trio.open_nursery() as nursery:
        await nursery.start(loop)
        os.eventfd_write(fds[0], 1)
        await trio.testing.wait_all_tasks_blocked()
        os.eventfd_write(fds[1], 2)
        os.eventfd_write(fds[2], 3)
    assert got == {0: 1, 1: 2, 2: 3}
