"""A blocking client: :class:`Client`, a thin socket shell around the protocol.

Not thread-safe: use one client per thread. Notifications that arrive while a
call waits for its response are queued, never lost.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

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

__all__ = ["Client"]


class Client:
    """A connection to vfio-irqd over its Unix socket.

    Connects at construction and, unless ``hello=False``, sends ``hello`` (the
    server requires it before anything else); its result is in
    :attr:`server_info`. ``timeout`` bounds each call in seconds (None: wait
    forever); a call that times out raises :class:`TimeoutError`, and its late
    response is discarded. Server errors raise :class:`~irqproto.errors.RpcError`,
    a closed connection :class:`~irqproto.errors.Disconnected`.
    """

    def __init__(
        self,
        path: str,
        *,
        client_name: str = "irqproto",
        timeout: float | None = 5.0,
        hello: bool = True,
        limits: Limits | None = None,
    ) -> None:
        """Connect to the socket at ``path``."""
        self.client_name = client_name
        self.timeout = timeout
        self.server_info: HelloResult | None = None
        self._core = ClientCore(limits)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            if hello:
                self.server_info = self.hello()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket and every received fd nobody took. Idempotent."""
        self._sock.close()
        self._core.close()

    def fileno(self) -> int:
        """The socket's fd, e.g. to wait for notifications with select/poll."""
        return self._sock.fileno()

    # -- generic calls -------------------------------------------------------------

    def call(self, method: str, params: Iterable[Any] = ()) -> Any:
        """Call ``method`` and return its result; fds it carries are closed."""
        outcome = self._call(method, params)
        close_fds(outcome.fds)
        return outcome.unwrap()

    def call_with_fds(self, method: str, params: Iterable[Any] = ()) -> tuple[Any, list[int]]:
        """Call ``method``; return its result and the fds it carried (now yours)."""
        outcome = self._call(method, params)
        return outcome.unwrap(), list(outcome.fds)

    def _call(self, method: str, params: Iterable[Any]) -> Outcome:
        deadline = _deadline(self.timeout)
        msgid, data = self._core.start_call(method, list(params))
        try:
            self._send(data, deadline)
            while (outcome := self._core.take(msgid)) is None:
                self._receive(deadline)
        except TimeoutError:
            self._core.abandon(msgid)
            raise
        return outcome

    # -- methods -------------------------------------------------------------------

    def hello(self) -> HelloResult:
        """Introduce this client; returns ``{"protocol", "server", "device"}``."""
        result: HelloResult = self.call(m.HELLO, m.HelloParams(self.client_name).to_params())
        return result

    def device_info(self) -> DeviceInfoResult:
        """The device and its IRQ indexes."""
        result: DeviceInfoResult = self.call(m.DEVICE_INFO)
        return result

    def subscribe(
        self, index: str, vectors: Iterable[int], opts: Mapping[str, Any] | None = None
    ) -> SubscribeResult:
        """Get ``irq`` notifications for ``vectors``; returns ``{"vectors", "enabled", "how"}``."""
        params = m.SubscribeParams(index, tuple(vectors), dict(opts or {})).to_params()
        result: SubscribeResult = self.call(m.SUBSCRIBE, params)
        return result

    def unsubscribe(self, index: str, vectors: Iterable[int]) -> UnsubscribeResult:
        """Stop ``irq`` notifications; counts queued before are delivered first."""
        params = m.UnsubscribeParams(index, tuple(vectors)).to_params()
        result: UnsubscribeResult = self.call(m.UNSUBSCRIBE, params)
        return result

    def trigger(self, index: str, vectors: Iterable[int]) -> None:
        """Have the kernel raise ``vectors`` once each (a loopback self-test)."""
        self.call(m.TRIGGER, m.TriggerParams(index, tuple(vectors)).to_params())

    def unmask(self, index: str = "intx") -> None:
        """Re-arm a level-triggered interrupt after handling it."""
        self.call(m.UNMASK, m.UnmaskParams(index).to_params())

    def claim(self, index: str, vector: int) -> int:
        """Take the vector's eventfd for yourself; returns the fd (now yours)."""
        outcome = self._call(m.CLAIM, m.ClaimParams(index, vector).to_params())
        outcome.unwrap()
        return single_fd(outcome)

    def unclaim(self, index: str, vector: int) -> None:
        """End a claim: the daemon takes the vector back. Close your fd of it too."""
        self.call(m.UNCLAIM, m.UnclaimParams(index, vector).to_params())

    def stats(self) -> StatsResult:
        """Counters of the whole daemon."""
        result: StatsResult = self.call(m.STATS)
        return result

    def sim_eventfds(self, index: str, vectors: Iterable[int]) -> list[int]:
        """Simulated device only: the vectors' eventfds, in the order asked for."""
        wanted = list(vectors)
        outcome = self._call(m.SIM_EVENTFDS, m.SimEventfdsParams(index, tuple(wanted)).to_params())
        return fds_by_vector(outcome.unwrap(), outcome.fds, wanted)

    # -- the device broker: device access (``drive``) and DMA memory (``dma``) --------

    def device_regions(self) -> list[dict[str, Any]]:
        """Where each region of the device sits in its fd (``device.regions``).

        Each item: ``{"index", "name", "size", "offset", "read", "write", "mmap",
        "sparse"}``; see :mod:`irqproto.driver` to map and access them.
        """
        result: list[dict[str, Any]] = self.call(m.DEVICE_REGIONS)
        return result

    def device_open(self) -> tuple[list[dict[str, Any]], int]:
        """The regions and a dup of the daemon's VFIO device fd (now yours: close it).

        Needs the ``drive`` permission. The fd reaches BARs and config space
        (``pread``/``pwrite``/``mmap`` at each region's ``offset``).
        """
        outcome = self._call(m.DEVICE_OPEN, m.DeviceOpenParams().to_params())
        result = outcome.unwrap()
        fd = single_fd(outcome, m.DEVICE_OPEN)
        regions = result.get("regions") if isinstance(result, dict) else None
        if not isinstance(regions, list):
            close_fds([fd])
            raise RemoteProtocolError(
                ErrorCode.EPROTO, f"device.open result lacks its regions: {result!r:.80}"
            )
        return regions, fd

    def device_reset(self) -> None:
        """Reset the device (``VFIO_DEVICE_RESET``); needs ``drive``.

        ``ENODEV`` when the device cannot be reset. Subscribers then get
        ``resized`` with ``possible_loss`` for their vectors.
        """
        self.call(m.DEVICE_RESET, m.DeviceResetParams().to_params())

    def dma_alloc(
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
        outcome = self._call(m.DMA_ALLOC, params)
        result = outcome.unwrap()
        fd = single_fd(outcome, m.DMA_ALLOC)
        if not isinstance(result, dict):
            close_fds([fd])
            raise RemoteProtocolError(
                ErrorCode.EPROTO, f"dma.alloc result is not a map: {result!r:.80}"
            )
        return {**result, "fd": fd}

    def dma_free(self, id: int) -> None:
        """Unmap and release a buffer of :meth:`dma_alloc`; stop the device's DMA first."""
        self.call(m.DMA_FREE, m.DmaFreeParams(id).to_params())

    # -- notifications -------------------------------------------------------------

    def next_notification(self, timeout: float | None = None) -> TypedNotification | Notification:
        """The next notification, waiting up to ``timeout`` seconds (None: forever).

        Raises :class:`TimeoutError`, or :class:`~irqproto.errors.Disconnected`
        once the server closed and every queued notification was read.
        """
        deadline = _deadline(timeout)
        while (note := self._core.next_notification()) is None:
            self._receive(deadline)
        return note

    def notifications(
        self, timeout: float | None = None
    ) -> Iterator[TypedNotification | Notification]:
        """Every notification until the server closes; ``timeout`` applies to each."""
        while True:
            try:
                yield self.next_notification(timeout)
            except Disconnected:
                return

    def interrupts(self, timeout: float | None = None) -> Iterator[IrqNotification]:
        """The ``irq`` notifications until the server closes; others are skipped.

        Use :meth:`notifications` to see ``resized`` and ``device_lost`` too.
        """
        for note in self.notifications(timeout):
            if isinstance(note, IrqNotification):
                yield note

    # -- I/O -----------------------------------------------------------------------

    def _send(self, data: bytes, deadline: float) -> None:
        self._sock.settimeout(_remaining(deadline))
        try:
            self._sock.sendall(data)
        except TimeoutError:
            # Part of the request may be out: the stream cannot be resynchronized.
            self._core.fail(Disconnected("a send timed out; the connection was abandoned"))
            self._sock.close()
            raise
        except OSError as exc:
            raise self._core.fail(exc) from exc

    def _receive(self, deadline: float) -> None:
        self._core.check()
        self._sock.settimeout(_remaining(deadline))
        try:
            data, ancdata, flags, _ = self._sock.recvmsg(RECV_SIZE, ANCBUFSIZE, RECV_FLAGS)
        except TimeoutError:
            raise  # a subclass of OSError, but the connection is still fine
        except OSError as exc:
            raise self._core.fail(exc) from exc
        self._core.receive(data, fds_from_ancdata(ancdata, flags))


def _deadline(timeout: float | None) -> float:
    return math.inf if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float) -> float | None:
    if deadline == math.inf:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("timed out")
    return remaining
