"""vfio-irqd against a reference C relay: latency, throughput, CPU, memory.

Run with ``make bench``. Prints figures and ratios; asserts only that every
count was exact (a benchmark that loses interrupts measures nothing).

The interrupt source and the client are C (``bench/csrc/benchtool.c``) for
both targets, so the only difference is what sits between the eventfd and the
client's socket:

* ``native`` and ``python``: ``vfio-irqd serve --sim --hot-loop native|python``
  in its own process (the native thread, and the Trio dispatcher it replaced,
  kept as the reference); the Python harness subscribes through the protocol,
  gets the vector eventfds with ``sim.eventfds`` and hands the connected
  socket and the eventfds to benchtool, which then only writes eventfds and
  reads ``irq`` notifications.
* ``relay``: benchtool's relay mode: one epoll set, drain every ready eventfd,
  write the same ``irq`` bytes to a socketpair. The floor for this design.

Figures (medians over ``--repeat`` runs, alternating the targets):

* latency from the eventfd write to the client having the whole notification,
  p50/p90/p99, one active vector among N registered (N = 1, 64, 2048);
* CPU per notification of the forwarding process (``/proc/PID/schedstat``);
* notifications/s and interrupts/s while another process writes N eventfds as
  fast as it can, with the exact total checked, and the forwarder's CPU per
  notification under that load;
* the daemon's RSS with 2048 vectors and 256 clients subscribed to all of them.

The load shapes only a broker has, against the same relay doing the same job
(medians over ``--broker-repeat`` runs):

* fan-out: one vector subscribed by K = 1, 16, 256 clients, the relay writing
  the same ``irq`` bytes to K sockets: CPU per delivered notification and the
  latency until the LAST client has its notification;
* storm isolation: one quiet vector, its own client, fired at a low steady
  rate, while a separate process fires the other 63 (2047) vectors, held by a
  second client that a sink drains, as fast as it can: the quiet vector's
  p50/p99 with and without the storm (exact totals checked on both clients);
* interrupts/s and CPU per interrupt under full load (the throughput rows),
  with two diagnostics of what the daemon's hot thread pays for living in a
  multi-threaded process: the relay again with an idle second thread
  ("relay-mt"), and benchtool's ``readcost``, the ns of one eventfd read in a
  single- and a multi-threaded process.

The storm's firing process runs SCHED_IDLE on the source CPU, so the quiet
client and the storm's sink, which share that CPU, are not kept waiting by
it: the quiet latency then measures the forwarder, not the source CPU's
scheduler.

``--quick`` is a smoke run (one repeat, few samples): it checks that every
mode works and every count is exact, its figures are not worth quoting.
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

#: The fan-out figures' client counts.
FAN_OUT = (1, 16, 256)
MAX_FAN_OUT = max(FAN_OUT)


def build_tool() -> Path:
    """Compile benchtool if it is missing or older than its sources."""
    if TOOL.exists() and all(TOOL.stat().st_mtime >= s.stat().st_mtime for s in SOURCES):
        return TOOL
    TOOL.parent.mkdir(exist_ok=True)
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-Wall", "-Wextra", "-Werror", "-O2", "-pthread", "-o", str(TOOL), str(SOURCES[0])]
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


#: With two CPUs or more, benchtool (interrupt source and client) runs on one
#: and the forwarder (every thread of it) on another, for every target alike.
#: Left to the scheduler, the two sometimes share a CPU (a cheaper wake-up) and
#: sometimes not, and which it was differs from run to run and target to target.
PINNED = (os.cpu_count() or 1) >= 2
SOURCE_CPU, FORWARDER_CPU = 0, 1


def pin_source() -> None:
    """preexec_fn of benchtool: the source CPU."""
    if PINNED:
        os.sched_setaffinity(0, {SOURCE_CPU})


def pin_source_background() -> None:
    """preexec_fn of the storm's firing process: the source CPU, SCHED_IDLE.

    It fires whenever that CPU has nothing else to do, which with the
    forwarder on the other CPU is nearly always; but the quiet vector's
    client and the storm's sink, which share that CPU with it, run the moment
    they wake instead of waiting out its time slice. Otherwise the quiet
    latency measures the scheduler of the source CPU, for every target alike.
    """
    pin_source()
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def pin_to_forwarder_cpu() -> None:
    """preexec_fn of a process measured as a forwarder."""
    if PINNED:
        os.sched_setaffinity(0, {FORWARDER_CPU})


def pin_forwarder(pid: int) -> None:
    """Every thread of ``pid`` onto the forwarder CPU."""
    if PINNED:
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), {FORWARDER_CPU})


def run_tool(*args: object, pass_fds: tuple[int, ...] = ()) -> list[str]:
    out = subprocess.run(
        [str(TOOL), *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
        pass_fds=pass_fds,
        preexec_fn=pin_source,
    )
    return out.stdout.split()


@dataclass
class Setup:
    """What benchtool needs to talk to one target."""

    sock_fd: int
    eventfds: list[int]
    pid: int


def wait_until_serving(proc: subprocess.Popen[bytes], path: Path, seconds: float) -> None:
    """Return once the daemon ``proc`` answers on ``path``; ``RuntimeError`` if it
    exits or ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with Client(str(path), client_name="bench-probe"):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not come up") from None
            time.sleep(0.05)


class DaemonTarget:
    """vfio-irqd on the simulated device, in its own process, with one hot loop."""

    def __init__(self, tmp: Path, name: str, *, hot_loop: str | None = None) -> None:
        self.name = name
        hot_loop = hot_loop or name
        self.path = tmp / f"irqd-{name}.sock"
        # Room for the fan-out's 256 clients plus the harness's own, and for
        # the kernel to finish closing one run's clients while the next connects.
        config = tmp / f"irqd-{name}.toml"
        config.write_text(f"[limits]\nmax_clients = {4 * MAX_FAN_OUT}\n")
        cmd = [sys.executable, "-m", "irqd", "serve", "--sim", "--sim-vectors", "2048"]
        cmd += ["--socket", str(self.path), "--log-level", "warning", "--hot-loop", hot_loop]
        cmd += ["--config", str(config)]
        self.proc = subprocess.Popen(cmd)
        wait_until_serving(self.proc, self.path, 30)
        # Serving: the hot thread exists by now.
        pin_forwarder(self.proc.pid)

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

    @contextlib.contextmanager
    def fan_setup(self, clients: int) -> Iterator[FanSetup]:
        """``clients`` clients, each subscribed to vector 0 alone."""
        with contextlib.ExitStack() as stack:
            held = [
                stack.enter_context(
                    Client(str(self.path), client_name=f"bench-fan-{i}", timeout=60)
                )
                for i in range(clients)
            ]
            for client in held:
                client.subscribe("msix", [0])
            (efd,) = held[0].sim_eventfds("msix", [0])
            try:
                yield FanSetup([c.fileno() for c in held], efd, self.proc.pid)
            finally:
                os.close(efd)

    @contextlib.contextmanager
    def storm_setup(self, vectors: int) -> Iterator[StormSetup]:
        """A quiet client on vector 0; a storm client on vectors 1..vectors-1."""
        with (
            Client(str(self.path), client_name="bench-quiet", timeout=60) as quiet,
            Client(str(self.path), client_name="bench-storm", timeout=60) as storm,
        ):
            quiet.subscribe("msix", [0])
            storm.subscribe("msix", list(range(1, vectors)))
            fds = quiet.sim_eventfds("msix", list(range(vectors)))
            try:
                yield StormSetup(quiet.fileno(), storm.fileno(), fds[0], fds[1:], self.proc.pid)
            finally:
                for fd in fds:
                    os.close(fd)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@dataclass
class FanSetup:
    """K client sockets all subscribed to one vector, and its eventfd."""

    sock_fds: list[int]
    eventfd: int
    pid: int


@dataclass
class StormSetup:
    """The quiet vector's client and eventfd; the storm's client and eventfds."""

    quiet_fd: int
    storm_fd: int
    quiet_eventfd: int
    storm_eventfds: list[int]
    pid: int


class RelayTarget:
    """benchtool's relay: the same path in plain C.

    ``idle_thread``: the relay process gets a second thread that never runs,
    so it pays what the daemon's hot thread pays for sharing its process's fd
    table (a diagnostic, "relay-mt"; see ``readcost``).
    """

    def __init__(self, *, idle_thread: bool = False) -> None:
        self.name = "relay-mt" if idle_thread else "relay"
        self.env = dict(os.environ)
        if idle_thread:
            self.env["BENCHTOOL_IDLE_THREAD"] = "1"

    @contextlib.contextmanager
    def _relay(self, mode: str, registered: int, clients: int) -> Iterator[tuple[list[int], int]]:
        """``benchtool <mode>`` on ``registered`` eventfds and ``clients``
        socketpairs: yields our ends of the sockets (in order) and its pid."""
        fds = []
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(clients)]
        for i in range(registered):
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            os.dup2(fd, RELAY_FD_BASE + i, inheritable=False)
            os.close(fd)
            fds.append(RELAY_FD_BASE + i)
        theirs = [pair[1].fileno() for pair in pairs]
        proc = subprocess.Popen(
            [str(TOOL), mode, str(RELAY_FD_BASE), str(registered), *map(str, theirs)],
            pass_fds=(*theirs, *fds),
            env=self.env,
        )
        pin_forwarder(proc.pid)
        for pair in pairs:
            pair[1].close()
        try:
            yield [pair[0].fileno() for pair in pairs], proc.pid
        finally:
            proc.terminate()
            proc.wait()
            for pair in pairs:
                pair[0].close()
            for fd in fds:
                os.close(fd)

    @contextlib.contextmanager
    def setup(self, active: list[int], registered: int) -> Iterator[Setup]:
        with self._relay("relay", registered, 1) as (socks, pid):
            yield Setup(socks[0], [RELAY_FD_BASE + v for v in active], pid)

    @contextlib.contextmanager
    def fan_setup(self, clients: int) -> Iterator[FanSetup]:
        with self._relay("relay", 1, clients) as (socks, pid):
            yield FanSetup(socks, RELAY_FD_BASE, pid)

    @contextlib.contextmanager
    def storm_setup(self, vectors: int) -> Iterator[StormSetup]:
        with self._relay("relay-split", vectors, 2) as (socks, pid):
            storm = [RELAY_FD_BASE + v for v in range(1, vectors)]
            yield StormSetup(socks[0], socks[1], RELAY_FD_BASE, storm, pid)

    def close(self) -> None:
        pass


Target = DaemonTarget | RelayTarget


def latency(target: Target, registered: int, samples: int) -> dict[str, float]:
    with target.setup([0], registered) as s:
        before = cpu_ns(s.pid)
        p50, p90, p99, worst, _taken = map(
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
            preexec_fn=pin_source,  # noqa: PLW1509  only sched_setaffinity, before exec
        )
        before = cpu_ns(s.pid)
        run_tool("fire", rounds, *s.eventfds, pass_fds=tuple(s.eventfds))
        out, _ = sink.communicate(timeout=120)
        cpu = cpu_ns(s.pid) - before
        if sink.returncode != 0:
            raise RuntimeError(f"{target.name}: counts were not exact")
        notifications, elapsed_ns = map(int, out.split())
    seconds = elapsed_ns / 1e9
    return {
        "notif_s": notifications / seconds,
        "irq_s": expected / seconds,
        "cpu_us": cpu / notifications / 1000,
        "cpu_irq_ns": cpu / expected,
    }


def fan_out(target: Target, clients: int, samples: int) -> dict[str, float]:
    """Latency to the last of ``clients`` clients, CPU per delivered notification."""
    with target.fan_setup(clients) as s:
        before = cpu_ns(s.pid)
        out = run_tool("fanlat", s.eventfd, samples, *s.sock_fds, pass_fds=(s.eventfd, *s.sock_fds))
        cpu = (cpu_ns(s.pid) - before) / (samples * clients) / 1000
    p50, p90, p99, worst, wakes = map(float, out)
    return {"p50": p50, "p90": p90, "p99": p99, "max": worst, "cpu_us": cpu, "wakes": wakes}


#: The quiet vector's rate in the storm figure: one interrupt per millisecond,
#: each sample waiting for the previous one's notification.
QUIET_INTERVAL_US = 1000


def storm(
    target: Target, vectors: int, samples: int, *, stormy: bool, max_ms: int
) -> dict[str, float]:
    """The quiet vector's latency, with the other vectors firing flat out or idle.

    The storm's notifications go to a client of their own, drained by a sink
    that checks their total against the writes the firing process made.
    """
    with target.storm_setup(vectors) as s:
        sink = firing = None
        if stormy:
            sink = subprocess.Popen(
                [str(TOOL), "sink", str(s.storm_fd), "-"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                pass_fds=(s.storm_fd,),
                preexec_fn=pin_source,  # noqa: PLW1509  only sched_setaffinity, before exec
            )
            firing = subprocess.Popen(
                [str(TOOL), "fire", "0", *map(str, s.storm_eventfds)],
                stdout=subprocess.PIPE,
                text=True,
                pass_fds=tuple(s.storm_eventfds),
                preexec_fn=pin_source_background,  # noqa: PLW1509  only sched_*, before exec
            )
        started = time.monotonic()
        try:
            out = run_tool(
                "latency",
                s.quiet_fd,
                s.quiet_eventfd,
                samples,
                QUIET_INTERVAL_US,
                max_ms,
                pass_fds=(s.quiet_fd, s.quiet_eventfd),
            )
        finally:
            elapsed = time.monotonic() - started
            writes = 0
            if firing is not None and sink is not None:
                firing.terminate()
                writes = int(firing.communicate(timeout=60)[0])
                sink.communicate(f"{writes}\n", timeout=120)
                if firing.returncode != 0 or sink.returncode != 0:
                    raise RuntimeError(f"{target.name}: storm counts were not exact")
    p50, p90, p99, worst, taken = map(float, out)
    return {
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "max": worst,
        "samples": taken,
        "storm_irq_s": writes / elapsed,
    }


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
    # The median of each figure, and the best run as ``<key>_best``: CPU time
    # per notification comes in two clusters some 30 % apart from run to run
    # (where the scheduler put the rest of the system), whatever the target,
    # and the best run is the one comparison that cluster cannot skew.
    summary: dict[str, dict[str, float]] = {}
    for name, results in runs.items():
        summary[name] = {key: statistics.median(r[key] for r in results) for key in results[0]}
        summary[name] |= {f"{key}_best": min(r[key] for r in results) for key in results[0]}
    return summary


def row(label: str, figures: dict[str, float], target: str, fmt: str = "11.1f") -> str:
    """One line: each daemon's figure, the relay's, and the native daemon's ratio to it."""
    relay = figures["relay"]
    ratio = figures["native"] / relay if relay else float("nan")
    cells = " ".join(format(figures[name], f">{fmt}") for name in ("native", "python", "relay"))
    return f"{label:<38} {cells} {ratio:>7.2f}  {target}"


def header(title: str) -> None:
    print(
        f"\n{title:<38} {'native':>11} {'python':>11} {'relay':>11} "
        f"{'ratio':>7}  target (native / relay)"
    )


def latency_tables(args: argparse.Namespace, targets: list[Target], tmp: Path) -> None:
    """One vector among N: latency and CPU; then the growth from N=1 and the RSS."""
    header("figure")
    lat = {}
    for n in (1, 64, 2048):
        lat[n] = median_of(
            args.repeat, targets, partial(latency, registered=n, samples=args.samples)
        )
        for key, label, target in (
            ("p50", "latency p50 µs", "<= 1.15"),
            ("p90", "latency p90 µs", ""),
            ("p99", "latency p99 µs", "<= 1.3"),
            ("cpu_us", "CPU µs per notification", "<= 1.3"),
        ):
            figures = {name: lat[n][name][key] for name in lat[n]}
            print(row(f"{label}, N={n}", figures, target))
    print()
    for name in ("native", "python", "relay"):
        first, last = lat[1][name], lat[2048][name]
        print(
            f"{name}: from N=1 to N=2048 registered: latency p50 "
            f"{last['p50'] / first['p50'] - 1:+.1%} (median), "
            f"{last['p50_best'] / first['p50_best'] - 1:+.1%} (best run); "
            f"CPU per notification {last['cpu_us'] / first['cpu_us'] - 1:+.1%} "
            f"(median), {last['cpu_us_best'] / first['cpu_us_best'] - 1:+.1%} (best run)"
            + ("; target within 5%" if name == "native" else "")
        )
    for name in ("native", "python"):
        # A daemon of its own, so the figure is the cost of the clients
        # and not of the heap the runs above left behind.
        fresh = DaemonTarget(tmp, f"{name}-memory", hot_loop=name)
        try:
            rss = memory(fresh, args.clients, 2048)
        finally:
            fresh.close()
        print(
            f"{name}: daemon RSS, 2048 vectors x {args.clients} clients: "
            f"{rss / 1024:.1f} MiB (target <= 64 MiB)"
        )


def read_cost(repeat: int) -> dict[str, float]:
    """ns per eventfd read on the forwarder CPU, single- and multi-threaded."""
    runs: dict[str, list[float]] = {"st": [], "mt": []}
    for _ in range(max(3, repeat)):
        for kind, values in runs.items():
            env = dict(os.environ) | ({"BENCHTOOL_IDLE_THREAD": "1"} if kind == "mt" else {})
            out = subprocess.run(
                [str(TOOL), "readcost", "64", "20000"],
                check=True,
                capture_output=True,
                text=True,
                env=env,
                preexec_fn=pin_to_forwarder_cpu,
            )
            values.append(float(out.stdout.split()[0]))
    return {kind: statistics.median(values) for kind, values in runs.items()}


def load_table(args: argparse.Namespace, targets: list[Target]) -> None:
    """Every vector of N fired flat out by another process: rates and CPU."""
    header("full load")
    for n, rounds in ((64, args.rounds), (2048, max(1, args.rounds * 64 // 2048))):
        # At N=64 the relay also runs with an idle second thread: the share
        # of the gap that comes from being a thread in a bigger process.
        diag: list[Target] = [RelayTarget(idle_thread=True)] if n == 64 else []
        tp = median_of(args.repeat, targets + diag, partial(throughput, vectors=n, rounds=rounds))
        figures = {name: tp[name]["notif_s"] for name in tp}
        print(row(f"notifications/s, N={n}", figures, ">= 0.9", "11.0f"))
        figures = {name: tp[name]["irq_s"] for name in tp}
        print(row(f"interrupts/s, N={n}", figures, ">= 1.0", "11.0f"))
        figures = {name: tp[name]["cpu_us"] for name in tp}
        print(row(f"CPU µs/notification, load, N={n}", figures, ""))
        figures = {name: tp[name]["cpu_irq_ns"] for name in tp}
        print(row(f"CPU ns/interrupt, load, N={n}", figures, ""))
        if diag:
            relay, mt = tp["relay"], tp["relay-mt"]
            print(
                f"  relay with an idle 2nd thread, N={n}: notifications/s {mt['notif_s']:.0f} "
                f"({mt['notif_s'] / relay['notif_s']:.2f} x relay), CPU µs/notification "
                f"{mt['cpu_us']:.1f} ({mt['cpu_us'] / relay['cpu_us']:.2f} x relay)"
            )
    cost = read_cost(args.repeat)
    print(
        f"  eventfd read (kernel + libc), median round of 64: single-threaded process "
        f"{cost['st']:.0f} ns, multi-threaded {cost['mt']:.0f} ns "
        f"({cost['mt'] / cost['st'] - 1:+.0%})"
    )


def broker_tables(args: argparse.Namespace, targets: list[Target]) -> None:
    """The fan-out and storm-isolation tables."""
    header("fan-out: one vector, K clients")
    for k in FAN_OUT:
        samples = max(200, args.fan_samples // k)
        fan = median_of(args.broker_repeat, targets, partial(fan_out, clients=k, samples=samples))
        for key, label, target, fmt in (
            ("cpu_us", "CPU µs per delivered notification", "<= 1.3", "11.1f"),
            ("p50", "latency to last client p50 µs", "<= 1.3", "11.1f"),
            ("p99", "latency to last client p99 µs", "<= 1.3", "11.1f"),
            # How many batches the K notifications reached the client in.
            ("wakes", "client wake-ups per sample", "", "11.2f"),
        ):
            print(row(f"{label}, K={k}", {name: fan[name][key] for name in fan}, target, fmt))
    header(f"storm: quiet vector, 1/{QUIET_INTERVAL_US} µs")
    for n in (64, 2048):
        runs = {}
        for stormy in (False, True):
            runs[stormy] = median_of(
                args.broker_repeat,
                targets,
                partial(storm, vectors=n, samples=args.storm_samples, stormy=stormy, max_ms=3000),
            )
        for key in ("p50", "p99"):
            for stormy in (False, True):
                label = f"quiet {key} µs, {'storm' if stormy else 'idle '} of {n - 1}"
                target = "" if stormy else "(reference)"
                print(row(label, {name: runs[stormy][name][key] for name in runs[stormy]}, target))
        growth = {name: runs[True][name]["p99"] / runs[False][name]["p99"] for name in runs[True]}
        print(
            row(f"quiet p99 storm / idle, {n - 1}", growth, "native <= 1.5, ratio <= 1.0", "11.2f")
        )
        figures = {name: runs[True][name]["storm_irq_s"] for name in runs[True]}
        print(row(f"storm interrupts/s, {n - 1} vectors", figures, "", "11.0f"))
        figures = {name: runs[True][name]["samples"] for name in runs[True]}
        print(row(f"quiet samples under storm, {n - 1}", figures, "", "11.0f"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10000, help="latency samples per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--rounds", type=int, default=2000, help="throughput rounds at N=64")
    parser.add_argument("--clients", type=int, default=256, help="clients for the memory figure")
    parser.add_argument(
        "--fan-samples", type=int, default=5000, help="fan-out samples per run at K=1 (/ K)"
    )
    parser.add_argument(
        "--broker-repeat", type=int, default=3, help="runs per fan-out and storm figure (median)"
    )
    parser.add_argument(
        "--storm-samples", type=int, default=1000, help="quiet-vector samples per storm run"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: one repeat, few samples, exact counts"
    )
    parser.add_argument(
        "--only",
        type=lambda text: set(text.split(",")),
        default={"latency", "load", "broker"},
        help="comma-separated tables: latency, load, broker (default: all)",
    )
    args = parser.parse_args()
    if args.quick:
        args.samples, args.repeat, args.rounds, args.clients = 1000, 1, 500, 16
        args.fan_samples, args.storm_samples, args.broker_repeat = 2000, 200, 1

    # 2048 eventfds for the relay on top of the daemon's: lift the soft limit.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    build_tool()
    started = time.monotonic()
    print(
        f"vfio-irqd benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, "
        + (
            f"source on CPU {SOURCE_CPU}, forwarder on CPU {FORWARDER_CPU}"
            if PINNED
            else "unpinned"
        )
    )
    with tempfile.TemporaryDirectory(prefix="irqd-bench-") as tmp:
        native = DaemonTarget(Path(tmp), "native")
        python = DaemonTarget(Path(tmp), "python")
        relay = RelayTarget()
        targets: list[Target] = [native, python, relay]
        try:
            if "latency" in args.only:
                latency_tables(args, targets, Path(tmp))
            if "load" in args.only:
                load_table(args, targets)
            if "broker" in args.only:
                broker_tables(args, targets)
        finally:
            native.close()
            python.close()
            relay.close()
    print(f"\n(all counts exact; {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
