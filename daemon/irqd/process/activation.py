"""Socket activation and the fd store on the way in: ``$LISTEN_FDS`` and friends.

sd_listen_fds(3): the manager passes fds starting at 3 (``SD_LISTEN_FDS_START``),
``$LISTEN_FDS`` says how many, ``$LISTEN_PID`` names the process they are meant
for (a forked child must not take its parent's), and ``$LISTEN_FDNAMES`` is a
colon-separated list of names: the socket unit's ``FileDescriptorName=``
(default: the socket unit's name) or the ``FDNAME=`` an fd was stored with.
The variables are removed once read, and every fd is made close-on-exec, as
``sd_listen_fds(unset_environment=1)`` does.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

import structlog

from irqd.errors import ConfigError

__all__ = [
    "SD_LISTEN_FDS_START",
    "InheritedFds",
    "check_listener",
    "inherited_fds",
    "take_listener",
]

log = structlog.get_logger("irqd.process.activation")

#: The first fd the manager passes (sd-daemon.h).
SD_LISTEN_FDS_START = 3


@dataclass
class InheritedFds:
    """The fds passed at start, by name; ``take`` hands each one out once."""

    fds: dict[str, list[int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(self.fds.values())

    def names(self) -> list[str]:
        """Names with fds not yet taken."""
        return [name for name, fds in self.fds.items() if fds]

    def take(self, name: str) -> int | None:
        """The first untaken fd named ``name``; the caller owns it from now on."""
        fds = self.fds.get(name)
        if not fds:
            return None
        return fds.pop(0)

    def take_prefix(self, prefix: str) -> dict[str, int]:
        """Every untaken fd whose name starts with ``prefix`` (the first of each name)."""
        found: dict[str, int] = {}
        for name in list(self.fds):
            if name.startswith(prefix):
                fd = self.take(name)
                if fd is not None:
                    found[name] = fd
        return found

    def close_rest(self) -> list[str]:
        """Close every fd nobody took; returns their names (for the log)."""
        left = []
        for name, fds in self.fds.items():
            for fd in fds:
                left.append(name)
                os.close(fd)
            fds.clear()
        return left


def split_fd_names(text: str, count: int) -> list[str]:
    """``$LISTEN_FDNAMES`` as one name per fd, even when a name has a colon in it.

    The list is colon-separated, but systemd names a socket unit's fd after the
    unit unless it sets ``FileDescriptorName=`` (systemd.socket(5)), and an
    instance named after a PCI address has colons (``vfio-irqd@0000:03:00.0.socket``).
    Socket fds come first and fd-store fds last (``service_collect_fds`` in
    systemd's ``src/core/service.c``), and the daemon's own store names never
    contain a colon: so the names are matched to fds from the end, and what is
    left over is the first fd's name.
    """
    parts = text.split(":") if text else []
    if len(parts) <= count or count <= 0:
        return parts
    tail = parts[len(parts) - (count - 1) :] if count > 1 else []
    return [":".join(parts[: len(parts) - len(tail)]), *tail]


def inherited_fds(env: MutableMapping[str, str] | None = None) -> InheritedFds:
    """Read and unset ``$LISTEN_FDS``/``$LISTEN_FDNAMES``/``$LISTEN_PID``.

    Fds without a name are called ``unknown`` (what sd_listen_fds_with_names
    reports). Nothing is returned when ``$LISTEN_PID`` names another process.
    """
    env = os.environ if env is None else env
    pid = env.pop("LISTEN_PID", None)
    count = env.pop("LISTEN_FDS", None)
    names_text = env.pop("LISTEN_FDNAMES", None)
    result = InheritedFds()
    if pid is None or count is None:
        return result
    try:
        if int(pid) != os.getpid():
            return result
        n = int(count)
    except ValueError:
        return result
    names = split_fd_names(names_text or "", n)
    for i in range(max(n, 0)):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else "unknown"
        result.fds.setdefault(name, []).append(fd)
    return result


def check_listener(fd: int) -> socket.socket:
    """A socket object for ``fd`` if it is a listening ``AF_UNIX`` stream socket.

    Anything else (a datagram socket from a misconfigured ``.socket`` unit, a
    TCP port, a regular file) is refused with ``ConfigError``: the daemon's
    protocol needs ``SO_PEERCRED`` and ``SCM_RIGHTS``. The fd is owned by the
    returned object; on error it is closed.
    """
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"inherited fd {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    problem = _listener_problem(sock)
    if problem is not None:
        sock.close()
        raise ConfigError(f"inherited fd {fd} {problem}")
    sock.set_inheritable(False)
    return sock


def _listener_problem(sock: socket.socket) -> str | None:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        return (
            f"is {sock.family.name}/{sock.type.name}; the socket unit must be ListenStream= "
            "on a Unix socket path"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "is a Unix stream socket that is not listening"
    return None


def take_listener(
    inherited: InheritedFds,
    skip: Callable[[str], bool],
    bind: Callable[[], socket.socket],
) -> tuple[socket.socket, bool]:
    """The listening socket, and whether this process created it (and owns its path).

    In order: the fd named ``listener`` (stored by a previous process), the
    first other inherited fd that ``skip`` does not claim (systemd's socket
    unit; any name), else ``bind()``.
    """
    fd = inherited.take("listener")
    if fd is not None:
        return check_listener(fd), False
    for name in inherited.names():
        if skip(name):
            continue
        fd = inherited.take(name)
        if fd is None:
            continue
        sock = check_listener(fd)
        log.info("socket.activated", name=name, address=str(sock.getsockname()))
        return sock, False
    return bind(), True
