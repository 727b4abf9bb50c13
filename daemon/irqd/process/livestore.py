"""The live fd store: everything a restarted daemon needs, in systemd's fd store all the time.

A SIGUSR2 hand-over (irqd.process.fdstore) puts every fd in the store at
the end of a process's life; a SIGKILL, a crash or a watchdog kill gives no
such chance, and the kernel resets a VFIO device whose last fd closes
(``vfio_pci_core_close_device`` in ``drivers/vfio/pci/vfio_pci_core.c``).
So from the moment the device is opened or adopted, the daemon keeps in
the store, under the same names as a hand-over:

* the device's fds (``device-<key>``), the daemon's REQ/ERR eventfds
  (``event-req``/``event-err``) and the listener;
* each vector's eventfd (``vector-<index>-<n>``) while the vector exists;
* each client's socket (``client-<id>``) while its session lives;
* the stream guard (:data:`GUARD_NAME`, a memfd with one byte per client
  slot saying whether that client's output may hold a part-written message);
* the crash-consistent state (:data:`LIVE_STATE_NAME`,
  irqd.process.crashstate).

:meth:`LiveStore.sync` brings the store to a wanted set in an order that
keeps it crash-consistent: first every missing fd is added (one
``FDSTORE=1`` message each), then the state is written, then the fds no
longer wanted are removed (``FDSTOREREMOVE=1``). At every instant the store
holds at least every fd the current state names; an fd without a state
entry is closed by the next process.

No ``BARRIER=1`` is needed per change: the manager reads every notification
datagram a service sent before it handles the SIGCHLD of its death
(systemd's ``src/core/manager.c`` gives the notify socket's event source a
higher priority, ``SD_EVENT_PRIORITY_NORMAL-8``, than the signal source that
sees SIGCHLD, ``SD_EVENT_PRIORITY_NORMAL-6``, so as to still know which
service a message came from), and a datagram is in the socket's queue once
``sendmsg`` returned. A message sent just before a crash is therefore not
lost.

systemd ignores ``FDSTORE=1`` for a file it holds already (``same_fd`` in
``service_add_fd_store``, ``src/core/service.c``), and ``FDSTOREREMOVE=1``
drops every fd of a name. A name whose fd changed is therefore removed
before the new fd is stored under it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from irqd.process.crashstate import CrashStateWriter
from irqd.process.sdnotify import Notifier

__all__ = [
    "GUARD_NAME",
    "LIVE_STATE_NAME",
    "FdIdentity",
    "LiveStore",
    "fd_identity",
]

log = structlog.get_logger("irqd.process.livestore")

#: The crash-consistent state memfd (irqd.process.crashstate).
LIVE_STATE_NAME = "live-state"
#: The stream guard's memfd (irqd.hotpath.guard).
GUARD_NAME = "guard"


@dataclass(frozen=True)
class FdIdentity:
    """Which open file an fd is, as far as this process can tell without a reference to it."""

    fd: int
    dev: int
    ino: int
    #: An anonymous inode (an eventfd): every one shares the same device and inode
    #: number, so only the fd number tells two apart.
    anonymous: bool

    def same_file(self, other: FdIdentity) -> bool:
        """Whether ``other``, under another fd number, is the same open file
        (never said of an anonymous inode: it cannot be told)."""
        return not self.anonymous and (self.dev, self.ino) == (other.dev, other.ino)


def fd_identity(fd: int) -> FdIdentity:
    """The identity of ``fd`` now."""
    st = os.fstat(fd)
    return FdIdentity(fd, st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode) == 0)


class LiveStore:
    """Keeps systemd's fd store equal to a wanted set of named fds, crash-consistently."""

    def __init__(
        self,
        notifier: Notifier,
        writer: CrashStateWriter,
        held: Mapping[str, FdIdentity] | None = None,
    ) -> None:
        """Store through ``notifier``; ``writer`` writes the state memfd (stored as
        :data:`LIVE_STATE_NAME`). ``held``: what the store holds already (the
        names a previous process left, with the identity of the fd this process
        took for each)."""
        self.notifier = notifier
        self.writer = writer
        self._stored: dict[str, FdIdentity] = dict(held or {})
        #: FDSTORE=1 and FDSTOREREMOVE=1 messages sent, for the tests and the log.
        self.added = 0
        self.removed = 0

    @property
    def names(self) -> list[str]:
        """The names this process believes the store holds."""
        return list(self._stored)

    def sync(self, desired: Mapping[str, int], write_state: Callable[[], object]) -> None:
        """Add what is missing, then ``write_state()``, then remove what is not wanted.

        ``desired`` maps names to fds (:data:`LIVE_STATE_NAME` is added here).
        """
        wanted = {**desired, LIVE_STATE_NAME: self.writer.fileno()}
        for name, fd in wanted.items():
            known = self._stored.get(name)
            if known is not None and known.fd == fd:
                # The same number is the same file: the daemon syncs after every
                # change, so no number of a stored name is closed and given to
                # another file in between. (No fstat per fd and request.)
                continue
            identity = fd_identity(fd)
            if known is not None and known.same_file(identity):
                self._stored[name] = identity  # the same file, under another number
                continue
            if known is not None:
                # The store would keep the old file and ignore the new one.
                self._remove(name)
            if not self.notifier.store_fd(fd, name):
                # The manager is not taking messages: the rest waits for the next
                # sync rather than each send waiting out its timeout now.
                log.warning("livestore.store_failed", name=name, note="retried at the next sync")
                break
            self._stored[name] = identity
            self.added += 1
        write_state()
        self._remove_all(name for name in list(self._stored) if name not in wanted)

    def clear(self) -> None:
        """Remove everything from the store: a clean stop, nothing for a later start."""
        self._remove_all(list(self._stored))

    def forget(self) -> None:
        """Stop tracking without removing (the store now belongs to a hand-over's
        next process, which takes it over as it finds it)."""
        self._stored = {}

    def _remove_all(self, names: Iterable[str]) -> None:
        for name in list(names):
            self._remove(name)

    def _remove(self, name: str) -> None:
        self._stored.pop(name, None)
        if self.notifier.notify({"FDSTOREREMOVE": 1, "FDNAME": name}):
            self.removed += 1

    def close(self) -> None:
        """Close the state memfd (the store keeps its own copy unless cleared)."""
        with contextlib.suppress(OSError):
            self.writer.close()
