"""The daemon's record of its live sessions, with an event per change.

The hand-over counts on it to know whom to park, the status line counts them,
and the tests wait on it (``Daemon.wait_sessions``) instead of polling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import trio

from irqd.hotpath.session import Session


class SessionSet:
    """The live sessions by id, the next id to give, and an event per change."""

    def __init__(self) -> None:
        self.by_id: dict[int, Session] = {}
        self.next_id = 1
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self.by_id.values()))

    def __contains__(self, session_id: object) -> bool:
        return session_id in self.by_id

    def live(self) -> list[Session]:
        """The live sessions, a copy."""
        return list(self.by_id.values())

    def take_id(self) -> int:
        """A fresh session id."""
        session_id = self.next_id
        self.next_id += 1
        return session_id

    def add(self, session: Session) -> None:
        """``session`` is served from now on."""
        self.by_id[session.id] = session
        self._changed_now()

    def remove(self, session: Session) -> None:
        """``session`` has ended."""
        del self.by_id[session.id]
        self._changed_now()

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, done: Callable[[dict[int, Session]], bool]) -> None:
        """Return once ``done(by_id)`` holds; looked at after every change."""
        while not done(self.by_id):
            await self._changed.wait()
