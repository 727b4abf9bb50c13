"""irqproto: the vfio-irqd wire protocol, sans-IO, depending on msgpack alone.

The core (this package's namespace) never imports ``socket`` or ``trio``.
The clients live in their own modules and import them on demand:
:mod:`irqproto.blocking` (``Client``) and :mod:`irqproto.trio_client`
(``open_client``).
"""

from __future__ import annotations

from .codec import Decoder, encode
from .connection import Connection
from .errors import (
    E2BIG,
    EACCES,
    EBUSY,
    EINVAL,
    ENODEV,
    ENOSPC,
    ENOSYS,
    EPROTO,
    Disconnected,
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    RequestError,
    RpcError,
)
from .limits import MAX_VECTOR, MAX_VECTORS_PER_REQUEST, Limits
from .messages import (
    NEED_DATA,
    ConnectionClosed,
    ErrorInfo,
    Event,
    Message,
    NeedData,
    Notification,
    Request,
    Response,
)
from .methods import (
    INDEX_NAMES,
    PROTOCOL_VERSION,
    ClaimParams,
    DeviceInfoParams,
    HelloParams,
    Params,
    SimEventfdsParams,
    StatsParams,
    SubscribeParams,
    TriggerParams,
    UnclaimParams,
    UnmaskParams,
    UnsubscribeParams,
    parse_params,
)
from .notifications import (
    DeviceLostNotification,
    ErrNotification,
    IrqNotification,
    ResizedNotification,
    ShutdownNotification,
    TypedNotification,
    encode_irq,
    parse_notification,
)

__all__ = [
    "E2BIG",
    "EACCES",
    "EBUSY",
    "EINVAL",
    "ENODEV",
    "ENOSPC",
    "ENOSYS",
    "EPROTO",
    "INDEX_NAMES",
    "MAX_VECTOR",
    "MAX_VECTORS_PER_REQUEST",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "ClaimParams",
    "Connection",
    "ConnectionClosed",
    "Decoder",
    "DeviceInfoParams",
    "DeviceLostNotification",
    "Disconnected",
    "ErrNotification",
    "ErrorCode",
    "ErrorInfo",
    "Event",
    "HelloParams",
    "IrqNotification",
    "Limits",
    "LocalProtocolError",
    "Message",
    "NeedData",
    "Notification",
    "Params",
    "ProtocolError",
    "RemoteProtocolError",
    "Request",
    "RequestError",
    "ResizedNotification",
    "Response",
    "RpcError",
    "ShutdownNotification",
    "SimEventfdsParams",
    "StatsParams",
    "SubscribeParams",
    "TriggerParams",
    "TypedNotification",
    "UnclaimParams",
    "UnmaskParams",
    "UnsubscribeParams",
    "encode",
    "encode_irq",
    "parse_notification",
    "parse_params",
]
