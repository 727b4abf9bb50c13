"""Test helpers: two :class:`Connection` objects wired back to back in memory.

Like h11's ``tests/helpers.py``: what one side sends, the other receives, so
an exchange can be checked in both directions without a socket.
"""

from __future__ import annotations

from typing import Literal

from .connection import Connection
from .limits import Limits
from .messages import NEED_DATA, Event, Message

__all__ = ["CLIENT", "SERVER", "ConnectionPair", "Role"]

Role = Literal["client", "server"]
CLIENT: Role = "client"
SERVER: Role = "server"


class ConnectionPair:
    """A client and a server :class:`Connection`; ``conn[role]`` is either."""

    def __init__(self, limits: Limits | None = None) -> None:
        """Create both ends with the same ``limits``."""
        self.conn: dict[Role, Connection] = {
            CLIENT: Connection(limits),
            SERVER: Connection(limits),
        }

    @staticmethod
    def other(role: Role) -> Role:
        """The peer of ``role``."""
        return SERVER if role == CLIENT else CLIENT

    def send(self, role: Role, *messages: Message) -> list[Event]:
        """``role`` sends ``messages``; returns what its peer then receives."""
        data = b"".join(self.conn[role].send(msg) for msg in messages)
        return self.deliver(self.other(role), data)

    def deliver(self, role: Role, data: bytes) -> list[Event]:
        """Feed ``data`` to ``role`` and return its events up to NEED_DATA."""
        receiver = self.conn[role]
        receiver.receive_data(data)
        events: list[Event] = []
        while (event := receiver.next_event()) is not NEED_DATA:
            events.append(event)
            if not data:  # after EOF every call says ConnectionClosed again
                break
        return events
