"""The results of the protocol's methods, typed (docs/protocol.md, "Methods").

Each is the map a successful response carries, as msgpack decodes it (lists,
str keys). The server builds them and the clients return them; a ``TypedDict``
is a plain ``dict`` at run time, so typing them changes nothing on the wire.
A newer server may add keys: read the ones listed here, ignore others.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypeAlias, TypedDict

__all__ = [
    "ClaimResult",
    "DeviceInfoResult",
    "DispatchStats",
    "DmaStats",
    "EmptyResult",
    "HelloResult",
    "IndexInfo",
    "LatencyStats",
    "LifecycleStats",
    "SimEventfdsResult",
    "StatsClient",
    "StatsResult",
    "StatsVector",
    "SubscribeHow",
    "SubscribeResult",
    "UnsubscribeResult",
]

#: How ``subscribe`` enabled the vectors it had to enable.
SubscribeHow: TypeAlias = Literal["dynamic", "prearm", "resize", "already"]


class IndexInfo(TypedDict):
    """One interrupt index in ``device.info``."""

    #: Vectors the index has (``VFIO_DEVICE_GET_IRQ_INFO``).
    count: int
    #: The kernel's ``VFIO_IRQ_INFO_*`` flags, raw (include/uapi/linux/vfio.h).
    flags: int
    #: ``VFIO_IRQ_INFO_NORESIZE``: adding a vector means disable and re-enable.
    noresize: bool
    #: Vectors can be added one at a time without touching the others.
    dynamic: bool
    #: The index is enabled on the device.
    active: bool
    #: Vectors with an eventfd assigned.
    enabled: list[int]
    #: Of those, the ones a client claimed.
    claimed: list[int]


class DeviceInfoResult(TypedDict):
    """``device.info``: the device, its backend and every index by its name."""

    #: The PCI address, or the simulated device's name.
    device: str
    #: ``sim`` or ``vfio``.
    backend: str
    msix_strategy: str
    intx: IndexInfo
    msi: IndexInfo
    msix: IndexInfo
    err: IndexInfo
    req: IndexInfo


class HelloResult(TypedDict):
    """``hello``: the protocol version, the server's name and the ``device.info`` result."""

    protocol: int
    server: str
    device: DeviceInfoResult


class SubscribeResult(TypedDict):
    """``subscribe``: what this call subscribed, what it enabled, and how."""

    vectors: list[int]
    enabled: list[int]
    how: SubscribeHow


class UnsubscribeResult(TypedDict):
    """``unsubscribe``: the vectors this call unsubscribed."""

    vectors: list[int]


class ClaimResult(TypedDict):
    """``claim``: the claimed vector (its eventfd comes with the response)."""

    vectors: list[int]


class SimEventfdsResult(TypedDict):
    """``sim.eventfds``: the vectors whose eventfds come with the response, in order."""

    vectors: list[int]


class EmptyResult(TypedDict):
    """``trigger``, ``unmask``, ``unclaim``: an empty map."""


class StatsVector(TypedDict):
    """One enabled vector in ``stats``."""

    index: str
    vector: int
    #: Interrupts seen since the vector was enabled.
    count: int
    subscribers: int
    #: The id of the client that claimed it, if one did.
    claimed_by: int | None


class StatsClient(TypedDict):
    """One connected client in ``stats``."""

    id: int
    name: str | None
    pid: int
    uid: int
    #: Subscriptions as ``[index, vector]``.
    vectors: list[list[str | int]]
    #: Claims as ``[index, vector]``.
    claims: list[list[str | int]]
    #: Counts queued for the client, not yet sent.
    pending: int
    #: Counts sent so far.
    delivered: int
    #: Bytes of DMA memory (``dma.alloc``) the client holds.
    dma_bytes: int


class DispatchStats(TypedDict):
    """``stats.dispatch``: the Trio dispatch loop and what forwards interrupts."""

    rounds: int
    events: int
    native: bool
    hot_loop: Literal["native", "python"]
    #: Only with the native hot loop: its thread's wake-ups.
    hot_rounds: NotRequired[int]


class LatencyStats(TypedDict):
    """``stats.latency_us``: ``counts[i]`` samples in ``(bounds[i-1], bounds[i]]`` µs."""

    bounds: list[int]
    counts: list[int]


class DmaStats(TypedDict):
    """``stats.dma``: DMA memory mapped for every client together."""

    bytes: int
    mappings: int


class LifecycleStats(TypedDict):
    """``stats.lifecycle``: restarts the device was carried across, since a fresh start."""

    handovers: int
    crash_recoveries: int


class StatsResult(TypedDict):
    """``stats``."""

    vectors: list[StatsVector]
    clients: list[StatsClient]
    dispatch: DispatchStats
    latency_us: LatencyStats
    #: Host vectors allocated per index name.
    host_vectors: dict[str, int]
    msix_strategy: str
    uptime_s: float
    dma: DmaStats
    lifecycle: LifecycleStats
