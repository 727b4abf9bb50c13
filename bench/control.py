"""What a control request costs, with and without a service manager: ``make bench``.

Under systemd (``$NOTIFY_SOCKET`` set) the daemon keeps its fd store and its
``live-state`` record current after every request that changes anything, so
that a crash does not reset the device (docs/crash-recovery.md). That record
describes every vector with its subscribers, so its cost grows with the
table. This measures it where it shows: the time from a ``subscribe`` or
``unsubscribe`` request to its response, with all but one of N vectors held
by each of K clients, for a daemon on the simulated device

* ``plain``: started by hand, no service manager;
* ``managed``: with ``$NOTIFY_SOCKET`` pointing at a datagram socket that
  takes every ``FDSTORE=1`` message as systemd would (and then closes the fds:
  what the store does with them costs the daemon nothing).

It also prints the time to connect the K clients, each subscribing at once.
Figures are medians over ``--repeat`` daemons; no target is asserted.
"""

from __future__ import annotations

import argparse
import array
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from run import wait_until_serving  # bench/run.py, beside this script

from irqproto.blocking import Client

#: (vectors, clients each subscribed to all of them).
SHAPES = ((64, 4), (2048, 64))
#: Request pairs (subscribe + unsubscribe of one more vector) per daemon.
PAIRS = 100


class NotifySink:
    """The service manager's side of ``$NOTIFY_SOCKET``: reads every message, closes the fds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd_size = array.array("i").itemsize
        while True:
            try:
                _, ancillary, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(253 * fd_size))
            except OSError:
                return
            self.messages += 1
            for _level, _kind, data in ancillary:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fd_size])
                for fd in fds:
                    os.close(fd)

    def close(self) -> None:
        self._sock.close()


@contextmanager
def daemon(tmp: Path, vectors: int, notify: Path | None) -> Iterator[Path]:
    """A daemon on the simulated device; its socket's path."""
    sock = tmp / "irqd.sock"
    config = tmp / "irqd.toml"
    config.write_text("[limits]\nmax_clients = 1024\n")
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    cmd = [sys.executable, "-m", "irqd", "serve", "--sim", "--sim-vectors", str(vectors)]
    cmd += ["--socket", str(sock), "--log-level", "warning", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env)
    try:
        wait_until_serving(proc, sock, 60)
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def measure(vectors: int, clients: int, managed: bool) -> dict[str, float]:
    """Setup seconds and ms per request for one daemon."""
    with tempfile.TemporaryDirectory(prefix="irqd-control-") as name:
        tmp = Path(name)
        sink = NotifySink(tmp / "notify") if managed else None
        try:
            with daemon(tmp, vectors, sink.path if sink else None) as sock:
                held: list[Client] = []
                try:
                    started = time.perf_counter()
                    for i in range(clients):
                        client = Client(str(sock), client_name=f"bench-{i}", timeout=120)
                        held.append(client)
                        client.subscribe("msix", list(range(vectors - 1)))
                    setup = time.perf_counter() - started
                    # The one vector nobody holds: each pair enables and
                    # releases it, so the record changes both times.
                    client = held[0]
                    started = time.perf_counter()
                    for _ in range(PAIRS):
                        client.subscribe("msix", [vectors - 1])
                        client.unsubscribe("msix", [vectors - 1])
                    per_request = (time.perf_counter() - started) / (2 * PAIRS)
                finally:
                    for client in held:
                        client.close()
            if sink is not None and sink.messages == 0:
                raise RuntimeError("the managed daemon sent the service manager nothing")
        finally:
            if sink is not None:
                sink.close()
    return {"setup_s": setup, "request_ms": per_request * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="daemons per figure (median)")
    parser.add_argument("--quick", action="store_true", help="smoke run: one daemon per figure")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat
    print(
        f"\ncontrol requests with and without a service manager (median of {repeat}):\n"
        f"{'vectors x clients':>18} {'':>8} {'ms/request':>11} {'setup s':>9}"
    )
    for vectors, clients in SHAPES:
        for managed in (False, True):
            runs = [measure(vectors, clients, managed) for _ in range(repeat)]
            request = statistics.median(r["request_ms"] for r in runs)
            setup = statistics.median(r["setup_s"] for r in runs)
            kind = "managed" if managed else "plain"
            print(f"{f'{vectors} x {clients}':>18} {kind:>8} {request:11.2f} {setup:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
