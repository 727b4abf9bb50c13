"""What one client may cost the daemon: the server-side limits and their defaults.

Each limit bounds memory, fds or time that a client (buggy or hostile) can take
from the daemon and so from every other client. docs/security.md lists them
with the error each one produces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from irqd.errors import ConfigError
from irqproto.limits import MAX_VECTORS_PER_REQUEST, Limits

__all__ = ["MIB", "LimitsError", "ServerLimits"]

#: A mebibyte, the unit of the DMA limits' defaults.
MIB = 1024 * 1024


class LimitsError(ConfigError, ValueError):
    """The ``[limits]`` table is wrong; ``key`` names the offending entry (a ``ValueError`` too)."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key
        self.detail = detail


@dataclass(frozen=True)
class ServerLimits:
    """Per-daemon and per-client limits.

    Attributes:
        max_clients: connections served at once. One more is answered
            ``E2BIG`` ("too many clients") on its first request and closed;
            until then it costs one fd for at most ``refuse_timeout``.
        max_vectors_per_request: vectors one ``subscribe``/``unsubscribe``/
            ``trigger`` may name (``EINVAL`` on ``params[1]`` beyond it). The
            protocol's own bound is 2048, the largest MSI-X table.
        max_outstanding: requests received and not yet answered. The daemon
            reads ahead while it answers in order; a client that pipelines more
            than this (in practice: sends requests and does not read the
            answers) breaks the limit and is disconnected, like any ``E2BIG``.
        hello_timeout: seconds from accept to a successful ``hello``; a client
            that has not said hello by then is disconnected.
        idle_timeout: seconds without a request after which a client that
            holds nothing (no subscription, no claim) is disconnected. A client
            waiting for interrupts is never idle. ``math.inf`` disables it.
        refuse_timeout: seconds a refused connection (not allowed, or too many
            clients) is given to send the request its error answers.
        dma_client_bytes: bytes of DMA memory (``dma.alloc``) one client may
            hold at once; beyond it ``E2BIG``. The memory is pinned: it
            cannot be swapped out while the device may reach it.
        dma_client_mappings: DMA buffers one client may hold at once (the
            kernel allows 65535 mappings per container, shared by every
            client); beyond it ``E2BIG``.
        dma_total_bytes: bytes of DMA memory every client together may
            hold; beyond it ``ENOSPC``. The kernel counts pinned pages against
            the daemon's ``RLIMIT_MEMLOCK`` (unless it has ``CAP_IPC_LOCK``),
            so the unit's ``LimitMEMLOCK=`` must be at least this.
        message: the decoder limits (message size, array and map lengths,
            nesting), docs/protocol.md "Limits"; exceeding one is ``E2BIG`` and
            a closed connection.
    """

    max_clients: int = 256
    max_vectors_per_request: int = MAX_VECTORS_PER_REQUEST
    max_outstanding: int = 32
    hello_timeout: float = 10.0
    idle_timeout: float = 300.0
    refuse_timeout: float = 1.0
    dma_client_bytes: int = 256 * MIB
    dma_client_mappings: int = 4096
    dma_total_bytes: int = 1024 * MIB
    message: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        for name in (
            "max_clients",
            "max_vectors_per_request",
            "max_outstanding",
            "dma_client_bytes",
            "dma_client_mappings",
            "dma_total_bytes",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise LimitsError(f"limits.{name}", f"must be a positive int, got {value!r}")
        if self.max_vectors_per_request > MAX_VECTORS_PER_REQUEST:
            raise LimitsError(
                "limits.max_vectors_per_request",
                f"at most {MAX_VECTORS_PER_REQUEST} (the protocol's bound)",
            )
        for name in ("hello_timeout", "idle_timeout", "refuse_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise LimitsError(f"limits.{name}", f"must be a positive number, got {value!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> ServerLimits:
        """Build limits from the config file's ``[limits]`` table.

        Keys are the attribute names above, plus the decoder limits by their
        ``irqproto.Limits`` names (``max_message_size``, ``max_array_len``,
        ``max_map_len``, ``max_str_len``, ``max_bin_len``, ``max_depth``).
        ``idle_timeout = 0`` disables the idle limit. Raises
        :class:`LimitsError` naming the key.
        """
        own = {f.name for f in fields(cls)} - {"message"}
        decoder = {f.name for f in fields(Limits)}
        values: dict[str, Any] = {}
        message: dict[str, Any] = {}
        for key, value in mapping.items():
            if key in own:
                values[key] = value
            elif key in decoder:
                message[key] = value
            else:
                raise LimitsError(
                    f"limits.{key}", f"unknown key; expected one of {sorted(own | decoder)}"
                )
        if values.get("idle_timeout") == 0:
            values["idle_timeout"] = math.inf
        try:
            limits = replace(Limits(), **message)
        except ValueError as exc:
            key = next((k for k in message if k in str(exc)), "limits")
            raise LimitsError(f"limits.{key}", str(exc)) from None
        return cls(message=limits, **values)
