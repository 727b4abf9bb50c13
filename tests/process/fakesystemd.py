"""systemd's side of sd_notify, played by a test: a datagram socket that keeps what it gets.

It answers ``BARRIER=1`` by closing the fd that came with it, keeps fds sent
with ``FDSTORE=1`` under their ``FDNAME=`` and drops them on ``FDSTOREREMOVE=1``,
as the service manager does (src/core/service.c, ``service_add_fd_store``):
an fd of a file the store holds already is ignored (``same_fd``, which asks
``kcmp(KCMP_FILE)``, src/basic/fd-util.c). :func:`restart_argv` starts the
next process with the store as ``$LISTEN_FDS``, as systemd does after the
service died (src/core/service.c ``service_set_socket_fds``).
"""

from __future__ import annotations

import array
import ctypes
import errno
import os
import platform
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

#: recvmsg's ancillary buffer: room for the most fds one message may carry (SCM_MAX_FD).
ANCILLARY_SIZE = socket.CMSG_SPACE(253 * array.array("i").itemsize)


#: kcmp(2)'s syscall number (arch/*/entry/syscalls tables) and KCMP_FILE
#: (include/uapi/linux/kcmp.h).
_SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
_KCMP_FILE = 0
_libc = ctypes.CDLL(None, use_errno=True)


def same_file(fd1: int, fd2: int) -> bool:
    """Whether two fds of this process are the same open file (systemd's ``same_fd``)."""
    if _SYS_KCMP is not None:
        pid = os.getpid()
        r = _libc.syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, fd1, fd2)
        if r >= 0:
            return bool(r == 0)
        if ctypes.get_errno() not in (errno.ENOSYS, errno.EPERM):
            return False
    # As systemd without kcmp: the same inode with the same flags.
    st1, st2 = os.fstat(fd1), os.fstat(fd2)
    return (st1.st_dev, st1.st_ino) == (st2.st_dev, st2.st_ino)


class NotifyState:
    """What the service manager keeps from sd_notify datagrams; no I/O.

    Shared by :class:`FakeManager` (Trio, the host's tests) and the threaded
    fake in tests/vm/guest/main.py, so both act on a message the same way.
    """

    def __init__(self) -> None:
        #: Every message, in order, as its fields.
        self.messages: list[dict[str, str]] = []
        #: The fd store: (name, fd) in the order they arrived.
        self.store: list[tuple[str, int]] = []
        #: Names of FDSTORE=1 fds ignored because the store held their file already.
        self.ignored: list[str] = []

    def handle(self, data: bytes, ancdata: list[tuple[int, int, bytes]]) -> dict[str, str]:
        """Record one datagram and act on it as systemd would; its fields."""
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % array.array("i").itemsize
                fds.extend(array.array("i", payload[:usable]))
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        if fields.get("FDSTORE") == "1":
            name = fields.get("FDNAME", "stored")
            for fd in fds:
                if any(same_file(fd, held) for _, held in self.store):
                    os.close(fd)  # systemd ignores a file it holds already
                    self.ignored.append(name)
                else:
                    self.store.append((name, fd))
        else:
            if fields.get("FDSTOREREMOVE") == "1":
                self.remove(fields.get("FDNAME", ""))
            for fd in fds:  # BARRIER=1's, and any other
                os.close(fd)
        return fields

    def remove(self, name: str) -> None:
        """``FDSTOREREMOVE=1``: close and forget every stored fd called ``name``."""
        for _, fd in [e for e in self.store if e[0] == name]:
            os.close(fd)
        self.store = [e for e in self.store if e[0] != name]

    def take_store(self) -> list[tuple[str, int]]:
        """The stored fds, handed to the caller (the next start of the service)."""
        store, self.store = self.store, []
        return store

    def copy_store(self) -> list[tuple[str, int]]:
        """Duplicates of the stored fds (the caller's to close), the store kept: what a
        restart after a crash gets while systemd keeps its own copies."""
        return [(name, os.dup(fd)) for name, fd in self.store]

    def names(self) -> list[str]:
        """The names in the store, in order."""
        return [name for name, _ in self.store]

    def close_store(self) -> None:
        """Close every fd still in the store."""
        for _, fd in self.take_store():
            os.close(fd)


def open_notify_socket(path: Path) -> socket.socket:
    """The bound datagram socket a ``$NOTIFY_SOCKET`` points at."""
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    raw.bind(str(path))
    # Room for thousands of FDSTORE datagrams while the test is busy elsewhere.
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return raw


class FakeManager(NotifyState):
    """A ``$NOTIFY_SOCKET`` at ``path``, read from Trio."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.sock = trio.socket.from_stdlib_socket(open_notify_socket(path))
        self._arrived = trio.Event()

    async def receive(self) -> dict[str, str]:
        """The next message, after acting on it as systemd would."""
        data, ancdata, _flags, _addr = await self.sock.recvmsg(65536, ANCILLARY_SIZE)
        return self.handle(data, ancdata)

    async def run(self) -> None:
        """Receive forever (start it in a nursery); ``wait_for`` sees what arrives."""
        while True:
            await self.receive()
            self._arrived.set()
            self._arrived = trio.Event()

    async def wait_for(self, key: str, value: str | None = None, since: int = 0) -> dict[str, str]:
        """The first message from index ``since`` on with ``key`` (equal to ``value``)."""
        while True:
            for fields in self.messages[since:]:
                if key in fields and (value is None or fields[key] == value):
                    return fields
            since = len(self.messages)
            await self._arrived.wait()

    def close(self) -> None:
        self.close_store()
        self.sock.close()


def restart_argv(argv: list[str], store: list[tuple[str, int]]) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment that start ``python argv`` with
    ``store`` as its ``$LISTEN_FDS`` (pass ``[fd for _, fd in store]`` as ``pass_fds``)."""
    fds = [fd for _, fd in store]
    env = {
        "HANDOVER_FDS": ",".join(map(str, fds)),
        "LISTEN_FDNAMES": ":".join(name for name, _ in store),
    }
    return ["-c", LAUNCHER, *argv], env


#: Runs as ``python -c``: puts the fds it inherited at 3, 4, ... in the order
#: given and execs the daemon with ``$LISTEN_FDS``, as systemd's exec does
#: (src/core/execute.c ``build_environment``, ``shift_fds``).
LAUNCHER = """
import os, sys
fds = [int(x) for x in os.environ.pop("HANDOVER_FDS").split(",") if x]
top = max([*fds, 2]) + len(fds) + 1
moved = []
for i, fd in enumerate(fds):
    moved.append(os.dup2(fd, top + i, inheritable=False))
for fd in fds:
    os.close(fd)
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


async def run_daemons(
    tmp_path: Path, body: Callable[[FakeManager, Path, list[trio.Process]], Awaitable[None]]
) -> Path:
    """Run ``body(manager, socket_path, processes)`` beside a receiving :class:`FakeManager`.

    ``body`` appends each daemon process it starts to ``processes``; any still
    running when it ends (a test that failed half-way) is killed. Returns the
    socket path, for the caller to check it was removed.
    """
    manager = FakeManager(tmp_path / "notify")
    sock = tmp_path / "irqd.sock"
    procs: list[trio.Process] = []
    try:
        async with trio.open_nursery() as background:
            background.start_soon(manager.run)
            await body(manager, sock, procs)
            background.cancel_scope.cancel()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
        manager.close()
    return sock


def daemon_argv(sock: Path, hot_loop: str) -> list[str]:
    """``python`` arguments of a daemon on the simulated device that a test restarts
    through the store (:func:`restart_argv`)."""
    return [
        "-m",
        "irqd",
        "serve",
        "--sim",
        "--sim-vectors",
        "16",
        "--socket",
        str(sock),
        "--log-format",
        "json",
        "--hot-loop",
        hot_loop,
    ]


def child_env(manager: FakeManager) -> dict[str, str]:
    """The environment of a daemon process that ``manager`` supervises."""
    env = dict(os.environ, NOTIFY_SOCKET=str(manager.path), PYTHONUNBUFFERED="1")
    env.pop("VFIO_IRQD_SOCKET", None)
    return env
