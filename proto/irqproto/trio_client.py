"""A Trio client: :func:`open_client` yields a :class:`TrioClient`.

A background task reads the socket, feeds the shared :class:`ClientCore`, and
wakes every waiter after each read; waiters then look for their own response
or a queued notification. One wake-up event for everything keeps the routing
trivially correct, and a client has few waiters at a time.

It uses ``trio.socket`` rather than ``SocketStream`` because fds arrive with
``recvmsg`` and SCM_RIGHTS.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio

from . import methods as m
from ._client import ClientCore, Outcome, close_fds, fds_by_vector, single_fd
from ._fdpass import ANCBUFSIZE, RECV_FLAGS, RECV_SIZE, fds_from_ancdata
from .errors import Disconnected, ErrorCode, RemoteProtocolError
from .limits import Limits
from .messages import Notification
from .notifications import IrqNotification, TypedNotification
from .results import (
    DeviceInfoResult,
    HelloResult,
    StatsResult,
    SubscribeResult,
    UnsubscribeResult,
)

__all__ = ["TrioClient", "open_client"]


@asynccontextmanager
async def open_client(
    path: str,
    *,
    client_name: str = "irqproto",
    timeout: float | None = 5.0,
    hello: bool = True,
    limits: Limits | None = None,
) -> AsyncIterator[TrioClient]:
    """Connect to vfio-irqd at ``path`` and, unless ``hello=False``, say hello.

    ``timeout`` bounds connecting and each call (None: wait forever); a call
    that times out raises :class:`TimeoutError`. On exit the reader stops and
    the socket and every untaken fd are closed.
    """
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with sock:
        with _timeout(timeout):
            await sock.connect(path)
        client = TrioClient(sock, client_name=client_name, timeout=timeout, limits=limits)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._read_forever)
                try:
                    if hello:
                        client.server_info = await client.hello()
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader never raises, so the group holds only the body's error;
            # callers want that error itself, not a one-item group.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            client._core.close()


class TrioClient:
    """The methods of :class:`irqproto.blocking.Client`, as coroutines.

    Create it with :func:`open_client`. Calls may run concurrently from several
    tasks; notifications are queued for whichever task reads them.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        *,
        client_name: str,
        timeout: float | None,
        limits: Limits | None,
    ) -> None:
        """Wrap a connected socket; use :func:`open_client` instead."""
        self.client_name = client_name
        self.timeout = timeout
        self.server_info: HelloResult | None = None
        self._sock = sock
        self._core = ClientCore(limits)
        self._send_lock = trio.Lock()  # one request's bytes never interleave another's
        self._changed = trio.Event()  # set after every read; replaced when set

    # -- generic calls -------------------------------------------------------------

    async def call(self, method: str, params: Iterable[Any] = ()) -> Any:
        """Call ``method`` and return its result; fds it carries are closed."""
        outcome = await self._call(method, params)
        close_fds(outcome.fds)
        return outcome.unwrap()

    async def call_with_fds(self, method: str, params: Iterable[Any] = ()) -> tuple[Any, list[int]]:
        """Call ``method``; return its result and the fds it carried (now yours)."""
        outcome = await self._call(method, params)
        return outcome.unwrap(), list(outcome.fds)

    async def _call(self, method: str, params: Iterable[Any]) -> Outcome:
        msgid, data = self._core.start_call(method, list(params))
        try:
            with _timeout(self.timeout):
                await self._send(data)
                while (outcome := self._core.take(msgid)) is None:
                    await self._changed.wait()
        except BaseException:
            # Timed out or cancelled: a late response must not be kept forever.
            self._core.abandon(msgid)
            raise
        return outcome

    # -- methods -------------------------------------------------------------------

    async def hello(self) -> HelloResult:
        """Introduce this client; returns ``{"protocol", "server", "device"}``."""
        params = m.HelloParams(self.client_name).to_params()
        result: HelloResult = await self.call(m.HELLO, params)
        return result

    async def device_info(self) -> DeviceInfoResult:
        """The device and its IRQ indexes."""
        result: DeviceInfoResult = await self.call(m.DEVICE_INFO)
        return result

    async def subscribe(
        self, index: str, vectors: Iterable[int], opts: Mapping[str, Any] | None = None
    ) -> SubscribeResult:
        """Get ``irq`` notifications for ``vectors``; returns ``{"vectors", "enabled", "how"}``."""
        params = m.SubscribeParams(index, tuple(vectors), dict(opts or {})).to_params()
        result: SubscribeResult = await self.call(m.SUBSCRIBE, params)
        return result

    async def unsubscribe(self, index: str, vectors: Iterable[int]) -> UnsubscribeResult:
        """Stop ``irq`` notifications; counts queued before are delivered first."""
        params = m.UnsubscribeParams(index, tuple(vectors)).to_params()
        result: UnsubscribeResult = await self.call(m.UNSUBSCRIBE, params)
        return result

    async def trigger(self, index: str, vectors: Iterable[int]) -> None:
        """Have the kernel raise ``vectors`` once each (a loopback self-test)."""
        await self.call(m.TRIGGER, m.TriggerParams(index, tuple(vectors)).to_params())

    async def unmask(self, index: str = "intx") -> None:
        """Re-arm a level-triggered interrupt after handling it."""
        await self.call(m.UNMASK, m.UnmaskParams(index).to_params())

    async def claim(self, index: str, vector: int) -> int:
        """Take the vector's eventfd for yourself; returns the fd (now yours)."""
        outcome = await self._call(m.CLAIM, m.ClaimParams(index, vector).to_params())
        outcome.unwrap()
        return single_fd(outcome)

    async def unclaim(self, index: str, vector: int) -> None:
        """End a claim: the daemon takes the vector back. Close your fd of it too."""
        await self.call(m.UNCLAIM, m.UnclaimParams(index, vector).to_params())

    async def stats(self) -> StatsResult:
        """Counters of the whole daemon."""
        result: StatsResult = await self.call(m.STATS)
        return result

    async def sim_eventfds(self, index: str, vectors: Iterable[int]) -> list[int]:
        """Simulated device only: the vectors' eventfds, in the order asked for."""
        wanted = list(vectors)
        params = m.SimEventfdsParams(index, tuple(wanted)).to_params()
        outcome = await self._call(m.SIM_EVENTFDS, params)
        return fds_by_vector(outcome.unwrap(), outcome.fds, wanted)

    # -- the device broker: device access (``drive``) and DMA memory (``dma``) --------

    async def device_regions(self) -> list[dict[str, Any]]:
        """Where each region of the device sits in its fd (``device.regions``).

        Each item: ``{"index", "name", "size", "offset", "read", "write", "mmap",
        "sparse"}``; see :mod:`irqproto.driver` to map and access them.
        """
        result: list[dict[str, Any]] = await self.call(m.DEVICE_REGIONS)
        return result

    async def device_open(self) -> tuple[list[dict[str, Any]], int]:
        """The regions and a dup of the daemon's VFIO device fd (now yours: close it).

        Needs the ``drive`` permission. The fd reaches BARs and config space
        (``pread``/``pwrite``/``mmap`` at each region's ``offset``).
        """
        outcome = await self._call(m.DEVICE_OPEN, m.DeviceOpenParams().to_params())
        result = outcome.unwrap()
        fd = single_fd(outcome, m.DEVICE_OPEN)
        regions = result.get("regions") if isinstance(result, dict) else None
        if not isinstance(regions, list):
            close_fds([fd])
            raise RemoteProtocolError(
                ErrorCode.EPROTO, f"device.open result lacks its regions: {result!r:.80}"
            )
        return regions, fd

    async def device_reset(self) -> None:
        """Reset the device (``VFIO_DEVICE_RESET``); needs ``drive``.

        ``ENODEV`` when the device cannot be reset. Subscribers then get
        ``resized`` with ``possible_loss`` for their vectors.
        """
        await self.call(m.DEVICE_RESET, m.DeviceResetParams().to_params())

    async def dma_alloc(
        self,
        size: int,
        *,
        iova: int | None = None,
        name: str | None = None,
        hugepages: bool = False,
        iova_max: int | None = None,
    ) -> dict[str, Any]:
        """DMA memory mapped for the device; needs ``dma``.

        Returns the result (``{"id", "iova", "size", ...}``) with the buffer's
        memfd added as ``"fd"`` (now yours: ``mmap`` it ``MAP_SHARED``, close it
        when done). ``size`` is a multiple of the page size; ``iova`` asks for
        that address, ``iova_max`` bounds it (narrow DMA masks). The mapping
        lasts until :meth:`dma_free` or until this connection closes.
        """
        params = m.DmaAllocParams(size, iova, name, hugepages, iova_max).to_params()
        outcome = await self._call(m.DMA_ALLOC, params)
        result = outcome.unwrap()
        fd = single_fd(outcome, m.DMA_ALLOC)
        if not isinstance(result, dict):
            close_fds([fd])
            raise RemoteProtocolError(
                ErrorCode.EPROTO, f"dma.alloc result is not a map: {result!r:.80}"
            )
        return {**result, "fd": fd}

    async def dma_free(self, id: int) -> None:
        """Unmap and release a buffer of :meth:`dma_alloc`; stop the device's DMA first."""
        await self.call(m.DMA_FREE, m.DmaFreeParams(id).to_params())

    # -- notifications -------------------------------------------------------------

    async def next_notification(
        self, timeout: float | None = None
    ) -> TypedNotification | Notification:
        """The next notification, waiting up to ``timeout`` seconds (None: forever).

        Raises :class:`TimeoutError`, or :class:`~irqproto.errors.Disconnected`
        once the server closed and every queued notification was read.
        """
        with _timeout(timeout):
            while (note := self._core.next_notification()) is None:
                await self._changed.wait()
        return note

    def notifications(
        self, timeout: float | None = None
    ) -> AsyncIterator[TypedNotification | Notification]:
        """Every notification until the server closes; ``timeout`` applies to each.

        For ``async for``. Leaving the loop early needs no clean-up: this is a
        plain iterator, not an async generator that Trio would have to finalize
        (and warn about, ``ResourceWarning``, when dropped unfinished).
        """
        return _Notifications(self, timeout)

    def interrupts(self, timeout: float | None = None) -> AsyncIterator[IrqNotification]:
        """The ``irq`` notifications until the server closes; others are skipped."""
        return _Interrupts(self, timeout)

    # -- I/O -----------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        self._core.check()
        async with self._send_lock:
            view = memoryview(data)
            try:
                while view:
                    sent = await self._sock.send(view)
                    view = view[sent:]
            except BaseException as exc:
                if isinstance(exc, OSError):
                    error = self._core.fail(exc)
                    self._wake()
                    raise error from exc
                if len(view) != len(data):
                    # Half a request is out: the stream cannot be resynchronized.
                    self._core.fail(Disconnected("a send was interrupted mid-request"))
                    self._wake()
                raise

    async def _read_forever(self) -> None:
        """The reader task: never raises, records failures in the core instead."""
        try:
            while self._core.error is None and not self._core.eof:
                data, ancdata, flags, _ = await self._sock.recvmsg(
                    RECV_SIZE, ANCBUFSIZE, RECV_FLAGS
                )
                self._core.receive(data, fds_from_ancdata(ancdata, flags))
                self._wake()
        except Exception as exc:  # recorded for every waiter, never lost
            self._core.fail(exc)
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


@contextmanager
def _timeout(seconds: float | None) -> Iterator[None]:
    """``trio.fail_after`` that raises the built-in :class:`TimeoutError`."""
    try:
        with trio.fail_after(math.inf if seconds is None else seconds):
            yield
    except trio.TooSlowError as exc:
        raise TimeoutError("timed out") from exc


class _Notifications:
    """:meth:`TrioClient.notifications`: each next notification, until the server closes."""

    def __init__(self, client: TrioClient, timeout: float | None) -> None:
        self._client = client
        self._timeout = timeout

    def __aiter__(self) -> _Notifications:
        return self

    async def __anext__(self) -> TypedNotification | Notification:
        try:
            return await self._client.next_notification(self._timeout)
        except Disconnected:
            raise StopAsyncIteration from None


class _Interrupts:
    """:meth:`TrioClient.interrupts`: each next ``irq`` notification, until the server closes."""

    def __init__(self, client: TrioClient, timeout: float | None) -> None:
        self._notifications = _Notifications(client, timeout)

    def __aiter__(self) -> _Interrupts:
        return self

    async def __anext__(self) -> IrqNotification:
        while True:
            note = await self._notifications.__anext__()
            if isinstance(note, IrqNotification):
                return note
