"""The methods of protocol version 1 and validation of their params.

:func:`parse_params` turns the params of a well-formed request into one of the
typed ``*Params`` classes, or raises :class:`RequestError` whose ``field``
names the offending part in wire terms (``params[1][3]``, ``params[0].protocol``).
It checks shape and ranges only; whether a vector exists on *this* device is
the server's business.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from .errors import EINVAL, ENOSYS, RequestError
from .limits import MAX_VECTOR, MAX_VECTORS_PER_REQUEST
from .messages import undecodable

__all__ = [
    "CLAIM",
    "DEVICE_INFO",
    "DEVICE_OPEN",
    "DEVICE_REGIONS",
    "DEVICE_RESET",
    "DMA_ALLOC",
    "DMA_FREE",
    "HELLO",
    "INDEX_NAMES",
    "MAX_DMA_NAME",
    "METHODS",
    "PROTOCOL_VERSION",
    "SIM_EVENTFDS",
    "STATS",
    "SUBSCRIBE",
    "TRIGGER",
    "UNCLAIM",
    "UNMASK",
    "UNSUBSCRIBE",
    "ClaimParams",
    "DeviceInfoParams",
    "DeviceOpenParams",
    "DeviceRegionsParams",
    "DeviceResetParams",
    "DmaAllocParams",
    "DmaFreeParams",
    "HelloParams",
    "Params",
    "SimEventfdsParams",
    "StatsParams",
    "SubscribeParams",
    "TriggerParams",
    "UnclaimParams",
    "UnmaskParams",
    "UnsubscribeParams",
    "parse_params",
]

#: The protocol version this library speaks, sent in ``hello``.
PROTOCOL_VERSION: Final = 1

#: VFIO IRQ indexes by name, in the kernel's order (VFIO_PCI_*_IRQ_INDEX 0..4).
INDEX_NAMES: Final = ("intx", "msi", "msix", "err", "req")

HELLO: Final = "hello"
DEVICE_INFO: Final = "device.info"
SUBSCRIBE: Final = "subscribe"
UNSUBSCRIBE: Final = "unsubscribe"
TRIGGER: Final = "trigger"
UNMASK: Final = "unmask"
CLAIM: Final = "claim"
#: An extension of the original method list: ends a claim without closing the connection.
UNCLAIM: Final = "unclaim"
STATS: Final = "stats"
SIM_EVENTFDS: Final = "sim.eventfds"
# The device broker: device access (permission ``drive``) and DMA memory (``dma``).
DEVICE_REGIONS: Final = "device.regions"
DEVICE_OPEN: Final = "device.open"
DEVICE_RESET: Final = "device.reset"
DMA_ALLOC: Final = "dma.alloc"
DMA_FREE: Final = "dma.free"

#: Longest ``name`` of a ``dma.alloc`` (it only labels the buffer in logs and stats).
MAX_DMA_NAME: Final = 64
#: Largest ``size``, ``iova`` or ``iova_max`` on the wire: a ``__u64`` of the kernel's
#: ``struct vfio_iommu_type1_dma_map`` (include/uapi/linux/vfio.h).
_U64_MAX: Final = 2**64 - 1


@dataclass(frozen=True, slots=True)
class HelloParams:
    """``hello [{"client": str, "protocol": 1}]``; other keys are ignored."""

    client: str
    protocol: int = PROTOCOL_VERSION

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return [{"client": self.client, "protocol": self.protocol}]


@dataclass(frozen=True, slots=True)
class DeviceInfoParams:
    """``device.info []``."""

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return []


@dataclass(frozen=True, slots=True)
class SubscribeParams:
    """``subscribe [index, [vector, ...], {opts}]``; opts may be omitted."""

    index: str
    vectors: tuple[int, ...]
    opts: dict[str, Any] = field(default_factory=dict)

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return [self.index, list(self.vectors), dict(self.opts)]


@dataclass(frozen=True, slots=True)
class UnsubscribeParams:
    """``unsubscribe [index, [vector, ...]]``."""

    index: str
    vectors: tuple[int, ...]

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return [self.index, list(self.vectors)]


@dataclass(frozen=True, slots=True)
class TriggerParams:
    """``trigger [index, [vector, ...]]``."""

    index: str
    vectors: tuple[int, ...]

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return [self.index, list(self.vectors)]


@dataclass(frozen=True, slots=True)
class UnmaskParams:
    """``unmask [index]``; only ``intx`` is level-triggered, the server decides."""

    index: str = "intx"

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return [self.index]


@dataclass(frozen=True, slots=True)
class ClaimParams:
    """``claim [index, vector]``."""

    index: str
    vector: int

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return [self.index, self.vector]


@dataclass(frozen=True, slots=True)
class UnclaimParams:
    """``unclaim [index, vector]``."""

    index: str
    vector: int

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return [self.index, self.vector]


@dataclass(frozen=True, slots=True)
class StatsParams:
    """``stats []``."""

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return []


@dataclass(frozen=True, slots=True)
class SimEventfdsParams:
    """``sim.eventfds [index, [vector, ...]]``."""

    index: str
    vectors: tuple[int, ...]

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return [self.index, list(self.vectors)]


@dataclass(frozen=True, slots=True)
class DeviceRegionsParams:
    """``device.regions []``."""

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return []


@dataclass(frozen=True, slots=True)
class DeviceOpenParams:
    """``device.open []``."""

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return []


@dataclass(frozen=True, slots=True)
class DeviceResetParams:
    """``device.reset []``."""

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return []


@dataclass(frozen=True, slots=True)
class DmaAllocParams:
    """``dma.alloc [size]`` or ``[size, {"iova", "name", "hugepages", "iova_max"}]``.

    ``iova``: map exactly there (it must be free and usable); ``iova_max``: the
    highest IOVA the device can reach (a narrow DMA mask), the buffer's last
    byte included; ``hugepages``: back it with huge pages where available.
    """

    size: int
    iova: int | None = None
    name: str | None = None
    hugepages: bool = False
    iova_max: int | None = None

    def to_params(self) -> list[Any]:
        """The params array for the wire; options at their default are left out."""
        opts: dict[str, Any] = {}
        if self.iova is not None:
            opts["iova"] = self.iova
        if self.name is not None:
            opts["name"] = self.name
        if self.hugepages:
            opts["hugepages"] = True
        if self.iova_max is not None:
            opts["iova_max"] = self.iova_max
        return [self.size, opts] if opts else [self.size]


@dataclass(frozen=True, slots=True)
class DmaFreeParams:
    """``dma.free [id]``."""

    id: int

    def to_params(self) -> list[Any]:
        """The params array for the wire."""
        return [self.id]


Params: TypeAlias = (
    HelloParams
    | DeviceInfoParams
    | SubscribeParams
    | UnsubscribeParams
    | TriggerParams
    | UnmaskParams
    | ClaimParams
    | UnclaimParams
    | StatsParams
    | SimEventfdsParams
    | DeviceRegionsParams
    | DeviceOpenParams
    | DeviceResetParams
    | DmaAllocParams
    | DmaFreeParams
)


def parse_params(method: str, params: Sequence[Any]) -> Params:
    """Validate ``params`` for ``method`` and return them typed.

    Raises :class:`RequestError`: ``ENOSYS`` (field ``method``) for an unknown
    method, ``EINVAL`` for a method name that is not UTF-8 and, naming the
    field, for bad params.
    """
    parser = _PARSERS.get(method)
    if parser is None:
        if undecodable(method):  # a bin name that is not UTF-8 (messages.from_wire)
            raw = method.encode("utf-8", "surrogateescape")
            raise RequestError(EINVAL, "method", f"a bin name that is not UTF-8: {raw!r:.80}")
        raise RequestError(ENOSYS, "method", f"unknown method {method!r:.80}")
    return parser(params)


# -- field validators; ``where`` is the field's wire name for the error ---------------


def _fail(where: str, detail: str) -> RequestError:
    return RequestError(EINVAL, where, detail)


def _arity(params: Sequence[Any], *counts: int) -> None:
    if len(params) not in counts:
        expected = " or ".join(str(n) for n in counts)
        raise _fail("params", f"expected {expected} params, got {len(params)}")


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"expected a string, got {type(value).__name__}")
    return value


def _index(value: object, where: str) -> str:
    name = _str(value, where)
    if name not in INDEX_NAMES:
        raise _fail(where, f"unknown IRQ index {name!r:.40}, expected one of {INDEX_NAMES}")
    return name


def _vector(value: object, where: str) -> int:
    # bool is an int subclass; True is not vector 1.
    if type(value) is not int:
        raise _fail(where, f"a vector is an int, got {type(value).__name__}")
    if not 0 <= value <= MAX_VECTOR:
        raise _fail(where, f"vector {value} is out of range 0..{MAX_VECTOR}")
    return value


def _vectors(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise _fail(where, f"expected an array of vectors, got {type(value).__name__}")
    if not value:
        raise _fail(where, "expected at least one vector")
    if len(value) > MAX_VECTORS_PER_REQUEST:
        raise _fail(where, f"at most {MAX_VECTORS_PER_REQUEST} vectors, got {len(value)}")
    seen: set[int] = set()
    for i, item in enumerate(value):
        vector = _vector(item, f"{where}[{i}]")
        if vector in seen:
            raise _fail(f"{where}[{i}]", f"vector {vector} is named twice")
        seen.add(vector)
    return tuple(value)


def _map(value: object, where: str) -> Mapping[Any, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"expected a map, got {type(value).__name__}")
    return value


# -- one parser per method --------------------------------------------------------


def _hello(params: Sequence[Any]) -> HelloParams:
    _arity(params, 1)
    body = _map(params[0], "params[0]")
    if "client" not in body:
        raise _fail("params[0].client", "missing")
    client = _str(body["client"], "params[0].client")
    if "protocol" not in body:
        raise _fail("params[0].protocol", "missing")
    protocol = body["protocol"]
    if type(protocol) is not int or protocol != PROTOCOL_VERSION:
        raise _fail(
            "params[0].protocol",
            f"unsupported protocol version {protocol!r:.20}, this server speaks {PROTOCOL_VERSION}",
        )
    return HelloParams(client, protocol)


def _device_info(params: Sequence[Any]) -> DeviceInfoParams:
    _arity(params, 0)
    return DeviceInfoParams()


def _subscribe(params: Sequence[Any]) -> SubscribeParams:
    _arity(params, 2, 3)
    index = _index(params[0], "params[0]")
    vectors = _vectors(params[1], "params[1]")
    opts: dict[str, Any] = {}
    if len(params) == 3:
        for key, value in _map(params[2], "params[2]").items():
            opts[_str(key, "params[2]")] = value
    return SubscribeParams(index, vectors, opts)


def _index_vectors(params: Sequence[Any]) -> tuple[str, tuple[int, ...]]:
    _arity(params, 2)
    return _index(params[0], "params[0]"), _vectors(params[1], "params[1]")


def _unsubscribe(params: Sequence[Any]) -> UnsubscribeParams:
    return UnsubscribeParams(*_index_vectors(params))


def _trigger(params: Sequence[Any]) -> TriggerParams:
    return TriggerParams(*_index_vectors(params))


def _sim_eventfds(params: Sequence[Any]) -> SimEventfdsParams:
    return SimEventfdsParams(*_index_vectors(params))


def _unmask(params: Sequence[Any]) -> UnmaskParams:
    _arity(params, 1)
    return UnmaskParams(_index(params[0], "params[0]"))


def _claim(params: Sequence[Any]) -> ClaimParams:
    _arity(params, 2)
    return ClaimParams(_index(params[0], "params[0]"), _vector(params[1], "params[1]"))


def _unclaim(params: Sequence[Any]) -> UnclaimParams:
    _arity(params, 2)
    return UnclaimParams(_index(params[0], "params[0]"), _vector(params[1], "params[1]"))


def _stats(params: Sequence[Any]) -> StatsParams:
    _arity(params, 0)
    return StatsParams()


def _u64(value: object, where: str) -> int:
    if type(value) is not int:
        raise _fail(where, f"expected an int, got {type(value).__name__}")
    if not 0 <= value <= _U64_MAX:
        raise _fail(where, f"{value} is out of range 0..2**64-1")
    return value


def _no_params(kind: Callable[[], Params]) -> Callable[[Sequence[Any]], Params]:
    def parse(params: Sequence[Any]) -> Params:
        _arity(params, 0)
        return kind()

    return parse


_DMA_OPTS: Final = ("iova", "name", "hugepages", "iova_max")


def _dma_alloc(params: Sequence[Any]) -> DmaAllocParams:
    _arity(params, 1, 2)
    size = _u64(params[0], "params[0]")
    opts = _map(params[1], "params[1]") if len(params) == 2 else {}
    for key in opts:
        if key not in _DMA_OPTS:
            raise _fail(f"params[1].{key!s:.40}", f"unknown option; expected one of {_DMA_OPTS}")
    iova = opts.get("iova")
    iova_max = opts.get("iova_max")
    name = opts.get("name")
    hugepages = opts.get("hugepages", False)
    if iova is not None:
        iova = _u64(iova, "params[1].iova")
    if iova_max is not None:
        iova_max = _u64(iova_max, "params[1].iova_max")
    if name is not None:
        name = _str(name, "params[1].name")
        if len(name) > MAX_DMA_NAME:
            raise _fail("params[1].name", f"at most {MAX_DMA_NAME} characters")
    if type(hugepages) is not bool:
        raise _fail("params[1].hugepages", f"expected a bool, got {type(hugepages).__name__}")
    return DmaAllocParams(size, iova, name, hugepages, iova_max)


def _dma_free(params: Sequence[Any]) -> DmaFreeParams:
    _arity(params, 1)
    return DmaFreeParams(_u64(params[0], "params[0]"))


_PARSERS: Final[dict[str, Callable[[Sequence[Any]], Params]]] = {
    HELLO: _hello,
    DEVICE_INFO: _device_info,
    SUBSCRIBE: _subscribe,
    UNSUBSCRIBE: _unsubscribe,
    TRIGGER: _trigger,
    UNMASK: _unmask,
    CLAIM: _claim,
    UNCLAIM: _unclaim,
    STATS: _stats,
    SIM_EVENTFDS: _sim_eventfds,
    DEVICE_REGIONS: _no_params(DeviceRegionsParams),
    DEVICE_OPEN: _no_params(DeviceOpenParams),
    DEVICE_RESET: _no_params(DeviceResetParams),
    DMA_ALLOC: _dma_alloc,
    DMA_FREE: _dma_free,
}

#: Every method of protocol version 1.
METHODS: Final = tuple(_PARSERS)
