"""Soak: many client processes come and go (some SIGKILLed) while interrupts fire.

Processes (all started from here, all real):

* the daemon, ``vfio-irqd serve --sim``;
* a *holder*, subscribed to every vector for the whole run, so that vectors
  (and the firer's eventfds) stay put; it must receive exactly what was fired;
* a *firer*, which writes the vector eventfds (``sim.eventfds``) in bursts, as
  the kernel would, and adds each burst to shared counters (``fired.bin``);
* ``--clients`` client processes, each looping: connect, subscribe to a few
  random vectors, read ``irq`` for a while, then either unsubscribe and check,
  or just leave. The parent SIGKILLs a random client every ``--kill-every``
  cycles (clients spend most of their time reading, so kills land mid-read)
  and starts another.

How a client knows what was fired while it was subscribed: the firer fires
only under an exclusive ``flock`` on ``fire.lock``; a client holds a shared one
from just before its ``subscribe`` request to its response, and again around
``unsubscribe``, and reads the counters inside. The daemon reads the eventfds at
each subscription change, so everything fired before the request belongs to the
old receivers and everything after the response to the new; and the
``unsubscribe`` response comes after every count for that subscription. So
``received == fired_at_unsubscribe - fired_at_subscribe``, exactly, per vector.

Flatness: after a warm-up phase all clients stop and the daemon's fd count
(/proc/PID/fd) and RSS are read; after ``--cycles`` more connection cycles they
are read again with the same processes connected. Exit status 0 only if every
check passed; the figures are printed either way.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from irqproto.blocking import Client
from irqproto.errors import Disconnected, RpcError
from irqproto.notifications import IrqNotification

VECTORS = 16
#: Allowed RSS growth between the two measurements: allocator noise, not a leak
#: (a leak of even 100 bytes per cycle is 1 MB over 10,000 cycles).
RSS_SLACK_KB = 2048


# -- shared state ------------------------------------------------------------------------


class Shared:
    """The fired counters (an mmap'ed file of u64) and the firing lock."""

    def __init__(self, workdir: Path, *, create: bool = False) -> None:
        path = workdir / "fired.bin"
        if create:
            path.write_bytes(bytes(8 * VECTORS))
        self._file = path.open("r+b")
        self.counters = mmap.mmap(self._file.fileno(), 8 * VECTORS)
        self._lock = (workdir / "fire.lock").open("a+b")

    def fired(self) -> list[int]:
        return list(struct.unpack_from(f"{VECTORS}Q", self.counters))

    def add(self, amounts: list[int]) -> None:
        now = self.fired()
        struct.pack_into(
            f"{VECTORS}Q", self.counters, 0, *(a + b for a, b in zip(now, amounts, strict=True))
        )

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        fcntl.flock(self._lock, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)


def drain(client: Client, received: dict[int, int]) -> None:
    """Add every queued ``irq`` count (what arrived before the last response)."""
    while True:
        try:
            note = client.next_notification(timeout=0)
        except TimeoutError:
            return
        if isinstance(note, IrqNotification):
            for vector, count in note.counts:
                received[vector] = received.get(vector, 0) + count


def read_for(client: Client, seconds: float, received: dict[int, int]) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            note = client.next_notification(timeout=left)
        except TimeoutError:
            return
        if isinstance(note, IrqNotification):
            for vector, count in note.counts:
                received[vector] = received.get(vector, 0) + count


# -- the roles -----------------------------------------------------------------------------


def run_client(socket_path: str, workdir: Path, seed: int) -> int:
    """Connection cycles until ``stop-clients`` exists; one result line per cycle."""
    rng = random.Random(seed)
    shared = Shared(workdir)
    stop = workdir / "stop-clients"
    with (workdir / f"client-{os.getpid()}.log").open("a", buffering=1) as log:
        while not stop.exists():
            vectors = sorted(rng.sample(range(VECTORS), rng.randint(1, 4)))
            received: dict[int, int] = {}
            with Client(socket_path, client_name=f"soak-{os.getpid()}", timeout=30) as client:
                with shared.shared():
                    start = shared.fired()
                    client.subscribe("msix", vectors)
                read_for(client, rng.uniform(0, 0.03), received)
                if rng.random() < 0.2:
                    log.write("left\n")  # leaves without unsubscribing
                    continue
                with shared.shared():
                    client.unsubscribe("msix", vectors)
                    end = shared.fired()
                drain(client, received)
            expected = {v: end[v] - start[v] for v in vectors}
            got = {v: received.get(v, 0) for v in vectors}
            if got == expected:
                log.write(f"ok {sum(got.values())}\n")
            else:
                log.write(f"bad expected={expected} got={got}\n")
    return 0


def run_firer(socket_path: str, workdir: Path) -> int:
    """Write the vector eventfds in bursts until ``stop-all`` exists."""
    shared = Shared(workdir)
    stop = workdir / "stop-all"
    rng = random.Random(1)
    with Client(socket_path, client_name="soak-firer") as client:
        fds = client.sim_eventfds("msix", range(VECTORS))
    try:
        (workdir / "firer-ready").touch()
        while not stop.exists():
            amounts = [rng.randint(1, 50) for _ in range(VECTORS)]
            with shared.exclusive():
                for fd, n in zip(fds, amounts, strict=True):
                    os.eventfd_write(fd, n)
                shared.add(amounts)
            time.sleep(0.0005)
    finally:
        for fd in fds:
            os.close(fd)
    return 0


def run_holder(socket_path: str, workdir: Path) -> int:
    """Subscribed to everything all along; must receive exactly what was fired."""
    shared = Shared(workdir)
    stop = workdir / "stop-all"
    received: dict[int, int] = {}
    with Client(socket_path, client_name="soak-holder", timeout=60) as client:
        client.subscribe("msix", range(VECTORS))
        (workdir / "holder-ready").touch()
        while not stop.exists():
            read_for(client, 0.2, received)
        with shared.shared():
            client.unsubscribe("msix", range(VECTORS))
            fired = shared.fired()
        drain(client, received)
    got = [received.get(v, 0) for v in range(VECTORS)]
    (workdir / "holder.json").write_text(json.dumps({"fired": fired, "received": got}))
    return 0


# -- the parent ----------------------------------------------------------------------------


@dataclass
class Figures:
    cycles: int = 0
    verified: int = 0
    left: int = 0
    bad: list[str] = field(default_factory=list)
    kills: int = 0


def daemon_usage(pid: int) -> tuple[int, int]:
    """(open fds, RSS in kB) of process ``pid``."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return fds, rss


def wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"soak: {what} exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise SystemExit(f"soak: {what} not ready after {timeout} s")
        time.sleep(0.01)


class Parent:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.socket = str(workdir / "irqd.sock")
        self.clients: list[subprocess.Popen[bytes]] = []
        self.figures = Figures()
        self.offsets: dict[Path, int] = {}
        self.rng = random.Random(args.seed)
        self.seeds = iter(range(args.seed * 1_000_003, 2**62))

    def spawn(self, *role: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, __file__, *role, self.socket, str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "children.err").open("ab"),
        )

    def spawn_client(self) -> None:
        self.clients.append(self.spawn("client", str(next(self.seeds))))

    def count(self) -> None:
        """Read the new result lines of every client log."""
        for path in self.workdir.glob("client-*.log"):
            with path.open() as log:
                log.seek(self.offsets.get(path, 0))
                chunk = log.read()
            complete = chunk[: chunk.rfind("\n") + 1]
            self.offsets[path] = self.offsets.get(path, 0) + len(complete)
            for line in complete.splitlines():
                self.figures.cycles += 1
                if line.startswith("ok"):
                    self.figures.verified += 1
                elif line == "left":
                    self.figures.left += 1
                else:
                    self.figures.bad.append(line)

    def phase(self, cycles: int, deadline: float) -> None:
        """Run clients until ``cycles`` more cycles are done, then stop them all."""
        (self.workdir / "stop-clients").unlink(missing_ok=True)
        target = self.figures.cycles + cycles
        next_kill = self.figures.cycles + self.args.kill_every
        for _ in range(self.args.clients):
            self.spawn_client()
        while self.figures.cycles < target and time.monotonic() < deadline:
            time.sleep(0.05)
            self.count()
            if self.figures.cycles >= next_kill:
                next_kill += self.args.kill_every
                victim = self.rng.choice(self.clients)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                self.clients.remove(victim)
                self.figures.kills += 1
                self.spawn_client()
            for proc in [p for p in self.clients if p.poll() is not None]:
                self.clients.remove(proc)  # should not happen: a client crashed
                self.figures.bad.append(f"client exited with {proc.returncode}")
                self.spawn_client()
        (self.workdir / "stop-clients").touch()
        for proc in self.clients:
            proc.wait(60)
            if proc.returncode != 0:
                self.figures.bad.append(f"client exited with {proc.returncode}")
        self.clients.clear()
        self.count()

    def settle(self, daemon_pid: int) -> tuple[int, int]:
        """The daemon's usage once only the holder is connected (the firer keeps
        its eventfds, not a connection)."""
        deadline = time.monotonic() + 30
        with Client(self.socket, client_name="soak-probe") as probe:
            while len(probe.stats()["clients"]) != 2:  # the holder and the probe
                if time.monotonic() > deadline:
                    raise SystemExit("soak: departed clients were not dropped")
                time.sleep(0.05)
        time.sleep(0.2)  # let the probe's own departure be processed
        return daemon_usage(daemon_pid)


def run_parent(args: argparse.Namespace) -> int:
    began = time.monotonic()
    deadline = began + args.max_seconds
    with tempfile.TemporaryDirectory(prefix="irqd-soak-") as tmp:
        workdir = Path(tmp)
        parent = Parent(args, workdir)
        Shared(workdir, create=True)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "irqd", "serve", "--sim", "--sim-vectors", str(VECTORS),
             "--socket", parent.socket, "--log-level", "warning"],
            stdout=(workdir / "daemon.log").open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        helpers: list[subprocess.Popen[bytes]] = []
        try:
            wait_for(Path(parent.socket), daemon, "the daemon")
            helpers.append(parent.spawn("holder"))
            wait_for(workdir / "holder-ready", helpers[0], "the holder")
            helpers.append(parent.spawn("firer"))
            wait_for(workdir / "firer-ready", helpers[1], "the firer")
            parent.phase(args.warmup, deadline)
            before = parent.settle(daemon.pid)
            warm = parent.figures.cycles
            parent.phase(args.cycles, deadline)
            after = parent.settle(daemon.pid)
            measured = parent.figures.cycles - warm
            (workdir / "stop-all").touch()
            for helper in helpers:
                helper.wait(60)
            holder = json.loads((workdir / "holder.json").read_text())
        finally:
            (workdir / "stop-all").touch()
            (workdir / "stop-clients").touch()
            for proc in [*parent.clients, *helpers]:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
            daemon.terminate()
            daemon.wait(30)
        problems = list(parent.figures.bad)
        if daemon.returncode not in (0, -signal.SIGTERM):
            problems.append(f"daemon exited with {daemon.returncode}")
        if measured < args.cycles:
            problems.append(f"only {measured} of {args.cycles} cycles in {args.max_seconds} s")
        return report(
            args,
            parent.figures,
            holder=holder,
            before=before,
            after=after,
            measured=measured,
            elapsed=time.monotonic() - began,
            problems=problems,
        )


def report(
    args: argparse.Namespace,
    figures: Figures,
    *,
    holder: dict[str, list[int]],
    before: tuple[int, int],
    after: tuple[int, int],
    measured: int,
    elapsed: float,
    problems: list[str],
) -> int:
    """Print the figures; 0 if every check passed."""
    (fds_before, rss_before), (fds_after, rss_after) = before, after
    fired = sum(holder["fired"])
    if holder["fired"] != holder["received"]:
        problems.append(f"holder: fired {holder['fired']} received {holder['received']}")
    if fds_after != fds_before:
        problems.append(f"daemon fds {fds_before} -> {fds_after}")
    if rss_after - rss_before > RSS_SLACK_KB:
        problems.append(f"daemon RSS grew {rss_after - rss_before} kB")
    summary = {
        "clients": args.clients,
        "connections": figures.cycles + figures.kills,
        "cycles_measured": measured,
        "verified_subscriptions": figures.verified,
        "left_without_unsubscribe": figures.left,
        "sigkilled": figures.kills,
        "interrupts_fired": fired,
        "interrupts_per_s": round(fired / elapsed),
        "daemon_fds": [fds_before, fds_after],
        "daemon_rss_kb": [rss_before, rss_after],
        "seconds": round(elapsed, 1),
        "problems": problems[:20],
    }
    print(
        f"soak: {summary['connections']} connections ({measured} cycles measured) "
        f"by {args.clients} clients, {figures.kills} SIGKILLed; "
        f"{figures.verified} subscriptions verified exact"
    )
    print(
        f"soak: {fired} interrupts fired ({summary['interrupts_per_s']}/s), "
        f"holder received all: {holder['fired'] == holder['received']}"
    )
    print(
        f"soak: daemon fds {fds_before} -> {fds_after}, "
        f"RSS {rss_before} kB -> {rss_after} kB; {elapsed:.1f} s"
    )
    print("soak: " + json.dumps(summary))
    if problems:
        print("soak: FAILED: " + "; ".join(problems[:5]))
        return 1
    print("soak: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("client", "firer", "holder"):
        role, rest = argv[0], argv[1:]
        with contextlib.suppress(KeyboardInterrupt, Disconnected, RpcError, BrokenPipeError):
            if role == "client":
                return run_client(rest[1], Path(rest[2]), int(rest[0]))
            if role == "firer":
                return run_firer(rest[0], Path(rest[1]))
            return run_holder(rest[0], Path(rest[1]))
        return 3
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--cycles", type=int, default=10_000, help="measured connection cycles")
    parser.add_argument("--warmup", type=int, default=1000, help="cycles before measuring")
    parser.add_argument(
        "--kill-every", type=int, default=100, help="SIGKILL a client every N cycles"
    )
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, default=1)
    return run_parent(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
