"""vfio-irqd against a reference C relay: latency, throughput, CPU, memory.

Run with ``make bench``. Prints figures and ratios; asserts only that every
count was exact (a benchmark that loses interrupts measures nothing).

The interrupt source and the client are C (``bench/csrc/benchtool.c``) for
both targets, so the only difference is what sits between the eventfd and the
client's socket:

* ``daemon``: ``vfio-irqd serve --sim`` in its own process; the Python harness
  subscribes through the protocol, gets the vector eventfds with
  ``sim.eventfds`` and hands the connected socket and the eventfds to
  benchtool, which then only writes eventfds and reads ``irq`` notifications.
* ``relay``: benchtool's relay mode: one epoll set, drain every ready eventfd,
  write the same ``irq`` bytes to a socketpair. The floor for this design.

Figures (medians over ``--repeat`` runs, alternating the targets):

* latency from the eventfd write to the client having the whole notification,
  p50/p90/p99, one active vector among N registered (N = 1, 64, 2048);
* CPU per notification of the forwarding process (``/proc/PID/schedstat``);
* notifications/s and interrupts/s while another process writes N eventfds as
  fast as it can, with the exact total checked;
* the daemon's RSS with 2048 vectors and 256 clients subscribed to all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from irqproto.blocking import Client

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "csrc" / "benchtool.c", HERE / "csrc" / "mpack.h"]
TOOL = HERE / "build" / "benchtool"

#: Fd numbers the relay's eventfds are moved to, so it can take a range.
RELAY_FD_BASE = 1000


def build_tool() -> Path:
    """Compile benchtool if it is missing or older than its sources."""
    if TOOL.exists() and all(TOOL.stat().st_mtime >= s.stat().st_mtime for s in SOURCES):
        return TOOL
    TOOL.parent.mkdir(exist_ok=True)
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(TOOL), str(SOURCES[0])]
    subprocess.run(cmd, check=True)
    return TOOL


def cpu_ns(pid: int) -> int:
    """Time ``pid`` has spent on a CPU, all threads (first field of schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        total += int((task / "schedstat").read_text().split()[0])
    return total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def run_tool(*args: object, pass_fds: tuple[int, ...] = ()) -> list[str]:
    out = subprocess.run(
        [str(TOOL), *map(str, args)], check=True, capture_output=True, text=True, pass_fds=pass_fds
    )
    return out.stdout.split()


@dataclass
class Setup:
    """What benchtool needs to talk to one target."""

    sock_fd: int
    eventfds: list[int]
    pid: int


class DaemonTarget:
    """vfio-irqd on the simulated device, in its own process."""

    name = "daemon"

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "irqd.sock"
        cmd = [sys.executable, "-m", "irqd", "serve", "--sim", "--sim-vectors", "2048"]
        cmd += ["--socket", str(self.path), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + 30
        while True:
            try:
                with Client(str(self.path), client_name="bench-probe"):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not come up") from None
                time.sleep(0.05)

    @contextlib.contextmanager
    def setup(self, active: list[int], registered: int) -> Iterator[Setup]:
        """A client subscribed to ``active``; another holds the rest of ``registered``."""
        with (
            Client(str(self.path), client_name="bench-registrar", timeout=60) as registrar,
            Client(str(self.path), client_name="bench", timeout=60) as client,
        ):
            rest = [v for v in range(registered) if v not in active]
            if rest:
                registrar.subscribe("msix", rest)
            client.subscribe("msix", active)
            fds = client.sim_eventfds("msix", active)
            try:
                yield Setup(client.fileno(), fds, self.proc.pid)
            finally:
                for fd in fds:
                    os.close(fd)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


class RelayTarget:
    """benchtool's relay: the same path in plain C."""

    name = "relay"

    @contextlib.contextmanager
    def setup(self, active: list[int], registered: int) -> Iterator[Setup]:
        fds = []
        for i in range(registered):
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            os.dup2(fd, RELAY_FD_BASE + i, inheritable=False)
            os.close(fd)
            fds.append(RELAY_FD_BASE + i)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc = subprocess.Popen(
            [str(TOOL), "relay", str(theirs.fileno()), str(RELAY_FD_BASE), str(registered)],
            pass_fds=(theirs.fileno(), *fds),
        )
        theirs.close()
        try:
            yield Setup(ours.fileno(), [fds[v] for v in active], proc.pid)
        finally:
            proc.terminate()
            proc.wait()
            ours.close()
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        pass


Target = DaemonTarget | RelayTarget


def latency(target: Target, registered: int, samples: int) -> dict[str, float]:
    with target.setup([0], registered) as s:
        before = cpu_ns(s.pid)
        p50, p90, p99, worst = map(
            float,
            run_tool(
                "latency", s.sock_fd, s.eventfds[0], samples, pass_fds=(s.sock_fd, *s.eventfds)
            ),
        )
        cpu = (cpu_ns(s.pid) - before) / samples / 1000
    return {"p50": p50, "p90": p90, "p99": p99, "max": worst, "cpu_us": cpu}


def throughput(target: Target, vectors: int, rounds: int) -> dict[str, float]:
    active = list(range(vectors))
    with target.setup(active, vectors) as s:
        expected = rounds * vectors
        sink = subprocess.Popen(
            [str(TOOL), "sink", str(s.sock_fd), str(expected)],
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=(s.sock_fd,),
        )
        run_tool("fire", rounds, *s.eventfds, pass_fds=tuple(s.eventfds))
        out, _ = sink.communicate(timeout=120)
        if sink.returncode != 0:
            raise RuntimeError(f"{target.name}: counts were not exact")
        notifications, elapsed_ns = map(int, out.split())
    seconds = elapsed_ns / 1e9
    return {"notif_s": notifications / seconds, "irq_s": expected / seconds}


def memory(target: DaemonTarget, clients: int, vectors: int) -> int:
    held = []
    try:
        for i in range(clients):
            client = Client(str(target.path), client_name=f"bench-mem-{i}", timeout=60)
            held.append(client)
            client.subscribe("msix", list(range(vectors)))
        return rss_kib(target.proc.pid)
    finally:
        for client in held:
            client.close()


def median_of(
    repeat: int, targets: list[Target], measure: Callable[[Target], dict[str, float]]
) -> dict[str, dict[str, float]]:
    runs: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
    for _ in range(repeat):
        for target in targets:  # alternate, so drift hits both alike
            runs[target.name].append(measure(target))
    return {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in runs.items()
    }


def row(label: str, daemon: float, relay: float, target: str) -> str:
    ratio = daemon / relay if relay else float("nan")
    return f"{label:<34} {daemon:>11.1f} {relay:>11.1f} {ratio:>7.2f}  {target}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=5000, help="latency samples per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--rounds", type=int, default=2000, help="throughput rounds at N=64")
    parser.add_argument("--clients", type=int, default=256, help="clients for the memory figure")
    args = parser.parse_args()

    # 2048 eventfds for the relay on top of the daemon's: lift the soft limit.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    build_tool()
    started = time.monotonic()
    print(
        f"vfio-irqd benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory(prefix="irqd-bench-") as tmp:
        daemon = DaemonTarget(Path(tmp))
        relay = RelayTarget()
        targets: list[Target] = [daemon, relay]
        try:
            print(f"\n{'figure':<34} {'daemon':>11} {'relay':>11} {'ratio':>7}  target")
            lat = {}
            for n in (1, 64, 2048):
                lat[n] = median_of(
                    args.repeat, targets, partial(latency, registered=n, samples=args.samples)
                )
                d, r = lat[n]["daemon"], lat[n]["relay"]
                print(row(f"latency p50 µs, N={n}", d["p50"], r["p50"], "<= 1.15"))
                print(row(f"latency p90 µs, N={n}", d["p90"], r["p90"], ""))
                print(row(f"latency p99 µs, N={n}", d["p99"], r["p99"], "<= 1.3"))
                print(row(f"CPU µs per notification, N={n}", d["cpu_us"], r["cpu_us"], "<= 1.3"))
            for n, rounds in ((64, args.rounds), (2048, max(1, args.rounds * 64 // 2048))):
                tp = median_of(args.repeat, targets, partial(throughput, vectors=n, rounds=rounds))
                d, r = tp["daemon"], tp["relay"]
                print(row(f"notifications/s, N={n}", d["notif_s"], r["notif_s"], ">= 0.9"))
                print(row(f"interrupts/s, N={n}", d["irq_s"], r["irq_s"], ""))
            growth = lat[2048]["daemon"]["p50"] / lat[1]["daemon"]["p50"] - 1
            print(f"\nlatency p50 from N=1 to N=2048 registered: {growth:+.1%} (target within 5%)")
            rss = memory(daemon, args.clients, 2048)
            print(
                f"daemon RSS, 2048 vectors x {args.clients} clients: {rss / 1024:.1f} MiB "
                "(target <= 64 MiB)"
            )
        finally:
            daemon.close()
            relay.close()
    print(f"\n(all counts exact; {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
