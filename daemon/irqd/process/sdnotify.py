"""The sd_notify protocol without libsystemd: one datagram per message to ``$NOTIFY_SOCKET``.

Facts from sd_notify(3) and systemd's ``src/libsystemd/sd-daemon/sd-daemon.c``:

- ``$NOTIFY_SOCKET`` is the path of an ``AF_UNIX`` datagram socket; a leading
  ``@`` means the abstract namespace (the ``@`` becomes a NUL byte). systemd
  also accepts ``vsock:`` addresses, which a daemon on a PCI device never sees
  and which are refused here.
- A message is newline-separated ``KEY=VALUE`` assignments in one datagram.
  File descriptors ride along as ``SCM_RIGHTS``; with ``FDSTORE=1`` systemd
  keeps them for the next start of the service (``FDNAME=`` names them; names
  come back in ``$LISTEN_FDNAMES``).
- systemd reads the sender's credentials to find the unit, so a message sent
  just before exiting may be read after the sender is gone and be dropped.
  ``BARRIER=1`` with the write end of a pipe is the fix: systemd closes its
  copy once it has processed everything sent before, and the read end then
  sees EOF (``sd_notify_barrier``).
- ``$WATCHDOG_USEC`` is the watchdog interval; ``$WATCHDOG_PID``, when set,
  names the process it is meant for. systemd recommends pinging at half the
  interval.

Sending never raises: a daemon run by hand has no ``$NOTIFY_SOCKET`` and every
call is then a no-op that returns ``False``; a send that fails is logged once
and returns ``False`` too.
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
from collections.abc import Mapping, Sequence

import structlog

__all__ = ["Notifier", "watchdog_interval"]

log = structlog.get_logger("irqd.process.sdnotify")

#: How long ``barrier`` waits for systemd by default.
BARRIER_TIMEOUT = 5.0


def _address(value: str) -> str | bytes:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ValueError(f"$NOTIFY_SOCKET={value!r}: only absolute paths and @abstract are supported")


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog interval in seconds systemd asked for, or ``None`` (sd_watchdog_enabled)."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


#: How long one notification may wait for room in the manager's queue.
SEND_TIMEOUT_SECONDS = 1


class Notifier:
    """A connection to the service manager's notification socket.

    ``Notifier.from_environment()`` reads ``$NOTIFY_SOCKET`` once; the variable
    is then removed so that child processes do not talk to systemd in our name.
    """

    def __init__(self, address: str | None) -> None:
        """``address`` as in ``$NOTIFY_SOCKET``; ``None`` makes every call a no-op."""
        self.address = address
        self._target = _address(address) if address else None
        self._sock: socket.socket | None = None
        self._failed = False
        if self._target is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # A datagram waits while the manager's queue is full (max_dgram_qlen).
            # systemd drains it at once; a manager that stopped reading must not
            # hang the daemon: the send fails after this long and the fd store
            # is brought up to date at the next sync (irqd.process.livestore).
            self._sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT_SECONDS, 0)
            )

    @classmethod
    def from_environment(cls, *, unset: bool = True) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` (a no-op one when it is not set)."""
        env = os.environ
        address = env.pop("NOTIFY_SOCKET", None) if unset else env.get("NOTIFY_SOCKET")
        return cls(address or None)

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening."""
        return self._sock is not None

    def notify(self, fields: Mapping[str, str | int], fds: Sequence[int] = ()) -> bool:
        """Send one message; ``False`` when there is no manager or the send failed."""
        if self._sock is None or self._target is None:
            return False
        text = "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())
        ancillary = []
        if fds:
            rights = array.array("i", fds).tobytes()
            ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, rights))
        try:
            self._sock.sendmsg([text.encode()], ancillary, 0, self._target)
        except OSError as exc:
            # As sd_notify: the manager going away is not the daemon's failure.
            # Said once, not per watchdog ping.
            if not self._failed:
                log.warning("sdnotify.failed", socket=self.address, error=str(exc))
            self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> bool:
        """``READY=1`` with a status line."""
        return self.notify({"READY": 1, "STATUS": status})

    def status(self, status: str) -> bool:
        """``STATUS=``: the one line ``systemctl status`` shows."""
        return self.notify({"STATUS": status})

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive."""
        return self.notify({"WATCHDOG": 1})

    def stopping(self, status: str) -> bool:
        """``STOPPING=1``."""
        return self.notify({"STOPPING": 1, "STATUS": status})

    def store_fd(self, fd: int, name: str) -> bool:
        """Put one fd in the fd store under ``name`` (``FDSTORE=1``, ``FDNAME=``)."""
        return self.notify({"FDSTORE": 1, "FDNAME": name}, [fd])

    def barrier(self, timeout: float = BARRIER_TIMEOUT) -> bool:
        """Wait until the manager has processed every message sent so far.

        Returns ``False`` without a manager and raises ``TimeoutError`` if it
        does not answer within ``timeout`` seconds. Blocking: called once, at
        hand-over, when nothing else may run anyway.
        """
        if self._sock is None:
            return False
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                self.notify({"BARRIER": 1}, [write_end])
            finally:
                os.close(write_end)
            poller = select.poll()
            poller.register(read_end, select.POLLHUP)
            if not poller.poll(int(timeout * 1000)):
                raise TimeoutError("the service manager did not answer BARRIER=1")
        finally:
            os.close(read_end)
        return True

    def close(self) -> None:
        """Close the socket; later calls are no-ops."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _one_line(text: str) -> str:
    # A newline would start a new assignment; STATUS= is meant to be one line.
    return " ".join(text.splitlines())
