"""``make run``: the whole interrupt path on the simulated device, in one terminal.

Starts three processes on a private socket in a temporary directory:

1. ``vfio-irqd serve --sim`` — the daemon, owning a simulated MSI-X device;
2. ``vfio-irqd watch msix 0 1 2`` — a client subscribed to three vectors;
3. ``vfio-irqd sim fire --rate 10 --count 0 0 1 2`` — a load generator writing
   those vectors' eventfds, exactly as the kernel does for real interrupts.

and streams the watcher's lines (and the daemon's log) to the terminal until
Ctrl-C or ``--duration`` seconds. Stops the children in order (firing first, so
the watcher sees the daemon's ``shutdown``), kills whatever does not stop in
time, and removes the temporary directory. Exits 1 if no interrupt arrived.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from irqd.tools.render import INDEXES
from irqproto.blocking import Client

__all__ = ["main", "wait_for_socket"]

#: How long the daemon may take to start listening.
READY_TIMEOUT = 15.0
#: How long each child may take to exit after SIGINT before it is killed.
STOP_TIMEOUT = 5.0
#: Daemon log events shown in the demo; the rest would drown the interrupts.
DAEMON_EVENTS_SHOWN = 12


def wait_for_socket(
    path: Path, deadline: float, alive: subprocess.Popen[str] | None = None
) -> None:
    """Poll-connect to ``path`` until the daemon answers or ``deadline`` (monotonic) passes.

    Raises ``TimeoutError`` at the deadline and ``RuntimeError`` if ``alive``
    exits first (the daemon failed to start).
    """
    delay = 0.01
    while True:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"the daemon exited with status {alive.returncode} before listening")
        try:
            # A full hello, not just connect(): the daemon is ready when it answers.
            with Client(str(path), client_name="vfio-irqd demo (readiness probe)", timeout=2.0):
                return
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listened on {path} in time")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[str]
    readers: list[threading.Thread] = field(default_factory=list)


class Demo:
    """The three processes, their output merged into one queue of ``(source, line)``."""

    def __init__(self, workdir: Path, out: IO[str]) -> None:
        self.workdir = workdir
        self.socket = workdir / "sim.sock"
        self.out = out
        self.lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self.children: dict[str, _Child] = {}
        self.interrupts = 0
        self.daemon_events = 0

    # -- processes -------------------------------------------------------------------

    def spawn(self, name: str, *args: str) -> _Child:
        """Start ``python -m irqd ARGS`` with its stdout and stderr read into the queue."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("VFIO_IRQD_SOCKET", None)  # --socket is always explicit here
        proc = subprocess.Popen(
            [sys.executable, "-m", "irqd", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
            # Own process group: the terminal's Ctrl-C reaches only the demo,
            # which then stops the children in a deliberate order.
            start_new_session=True,
        )
        child = _Child(name, proc)
        assert proc.stdout is not None and proc.stderr is not None
        for stream, tag in ((proc.stdout, name), (proc.stderr, f"{name}!")):
            reader = threading.Thread(target=self._pump, args=(tag, stream), daemon=True)
            reader.start()
            child.readers.append(reader)
        self.children[name] = child
        return child

    def _pump(self, tag: str, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put((tag, line.rstrip("\n")))
        self.lines.put((tag, None))

    def stop(self, name: str) -> int | None:
        """SIGINT the child, wait up to :data:`STOP_TIMEOUT`, then SIGKILL it."""
        child = self.children.get(name)
        if child is None:
            return None
        proc = child.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.say(f"{name} did not stop within {STOP_TIMEOUT:g} s; killing it")
                proc.kill()
                proc.wait()
        for reader in child.readers:
            reader.join(STOP_TIMEOUT)
        return proc.returncode

    # -- output ----------------------------------------------------------------------

    def say(self, text: str) -> None:
        """A line from the demo itself."""
        self.out.write(f"demo    | {text}\n")
        self.out.flush()

    def show(self, tag: str, line: str) -> None:
        """Print one child's line, prettifying the daemon's JSON log."""
        if tag == "daemon":
            line = self._daemon_line(line)
            if not line:
                return
        elif tag == "watch" and line.split(" ", 1)[0] in INDEXES:
            self.interrupts += _sum_irq_line(line)
        self.out.write(f"{tag:<7} | {line}\n")
        self.out.flush()

    def _daemon_line(self, line: str) -> str:
        try:
            event = json.loads(line)
        except ValueError:
            return line
        if not isinstance(event, dict):
            return line
        self.daemon_events += 1
        level = str(event.pop("level", ""))
        if self.daemon_events > DAEMON_EVENTS_SHOWN and level in ("debug", "info"):
            if self.daemon_events == DAEMON_EVENTS_SHOWN + 1:
                return "(further daemon info lines hidden; see vfio-irqd status)"
            return ""
        event.pop("timestamp", None)
        name = event.pop("event", "?")
        rest = " ".join(f"{k}={v}" for k, v in event.items() if v != "")
        return f"{level:<7} {name} {rest}".rstrip()

    def wait_subscribed(self, deadline: float) -> None:
        """Show lines until watch prints ``subscribed``; ``TimeoutError`` at ``deadline``."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("watch did not subscribe in time")
            try:
                tag, line = self.lines.get(timeout=min(0.5, remaining))
            except queue.Empty:
                continue
            if line is None:
                if tag in ("watch", "daemon"):
                    raise RuntimeError(f"{tag} exited before watch subscribed")
                continue
            self.show(tag, line)
            if tag == "watch" and line.startswith("subscribed"):
                return

    def drain(self, until: float | None) -> bool:
        """Show queued lines until ``until`` (monotonic; ``None``: only what is queued).

        With a deadline, returns ``False`` as soon as a child's stdout ends
        (it exited while it should be running).
        """
        while True:
            timeout = None if until is None else until - time.monotonic()
            try:
                if timeout is None:
                    tag, line = self.lines.get_nowait()
                elif timeout <= 0:
                    return True
                else:
                    tag, line = self.lines.get(timeout=min(timeout, 0.5))
            except queue.Empty:
                if until is None:
                    return True
                continue
            if line is None:
                if until is not None and not tag.endswith("!"):
                    return False
                continue
            self.show(tag, line)


def _sum_irq_line(line: str) -> int:
    # "msix  v0 +3 (total 12)  v2 +1 (total 4)" -> 4
    return sum(
        int(word[1:]) for word in line.split() if word.startswith("+") and word[1:].isdigit()
    )


def _banner(sock: Path, duration: float | None) -> str:
    stop = f"it stops by itself after {duration:g} s" if duration else "Ctrl-C stops everything"
    me = "vfio-irqd"
    return f"""\
vfio-irqd demo — the whole interrupt path on a simulated MSI-X device.

  daemon  | {me} serve --sim --socket {sock}
            owns the (simulated) device, one eventfd per enabled vector
  watch   | {me} watch --socket {sock} msix 0 1 2
            a client: subscribes to vectors 0-2 and prints each 'irq' notification
  fire    | {me} sim fire --socket {sock} --rate 10 --count 0 0 1 2
            writes those vectors' eventfds 10 times a second, as the kernel would

Try in another terminal while it runs:
  {me} status --socket {sock}
  {me} watch --socket {sock} msix 1
  {me} sim fire --socket {sock} --count 1000 1

{stop}.
"""


def run_demo(duration: float | None, out: IO[str]) -> int:
    """Run the demo; the exit status is 0 if interrupts arrived, else 1."""
    workdir = Path(tempfile.mkdtemp(prefix="vfio-irqd-demo-"))
    demo = Demo(workdir, out)
    sock = str(demo.socket)
    ok = False
    try:
        out.write(_banner(demo.socket, duration) + "\n")
        out.flush()
        daemon = demo.spawn("daemon", "serve", "--sim", "--socket", sock, "--log-format", "json")
        wait_for_socket(demo.socket, time.monotonic() + READY_TIMEOUT, alive=daemon.proc)
        demo.drain(None)

        demo.spawn("watch", "watch", "--socket", sock, "msix", "0", "1", "2")
        # sim.eventfds only has fds for subscribed vectors: wait for watch's
        # "subscribed" line before starting the generator.
        demo.wait_subscribed(time.monotonic() + READY_TIMEOUT)
        demo.spawn(
            "fire", "sim", "fire", "--socket", sock, "--rate", "10", "--count", "0", "0", "1", "2"
        )

        end = time.monotonic() + duration if duration else None
        while end is None or time.monotonic() < end:
            step = time.monotonic() + 0.5
            if not demo.drain(step if end is None else min(step, end)):
                demo.say("a process ended unexpectedly; stopping")
                break
        ok = True
    except KeyboardInterrupt:
        ok = True
    except (TimeoutError, RuntimeError) as exc:
        demo.say(f"failed: {exc}")
    finally:
        # A second Ctrl-C must not cut the cleanup short: every wait below is bounded.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        previous_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            demo.say("stopping: fire, then the daemon (watch sees its shutdown)")
            for name in ("fire", "daemon", "watch"):
                demo.stop(name)
            demo.drain(None)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term)
    demo.say(f"{demo.interrupts} interrupts seen by watch")
    if not ok or demo.interrupts == 0:
        demo.say("no interrupts arrived" if ok else "the demo did not run to the end")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m irqd.tools.demo [--duration S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m irqd.tools.demo",
        description="Run vfio-irqd on a simulated device, fire interrupts and watch them arrive.",
    )
    parser.add_argument(
        "--duration",
        metavar="S",
        type=float,
        help="stop by itself after S seconds (default: run until Ctrl-C)",
    )
    args = parser.parse_args(argv)
    if args.duration is not None and not args.duration > 0:
        parser.error("--duration must be positive")
    # Explicit handlers: a process started in the background by a
    # non-interactive shell inherits SIGINT ignored, and SIGTERM (systemd,
    # timeout(1), a test harness) should clean up like Ctrl-C. Handled (not
    # ignored) signals are reset to their default in the children, so they
    # get their own Ctrl-C behaviour back too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    return run_demo(args.duration, sys.stdout)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
