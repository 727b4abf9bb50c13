"""``make run`` (``python -m irqd.tools.demo``): it runs, shows interrupts, and cleans up."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import Lines, reap

#: Generous: the demo itself needs about a second beyond --duration.
DEADLINE = 60.0


def _demo(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "irqd.tools.demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _workdir(output: str) -> Path:
    match = re.search(r"--socket (\S+)/sim\.sock", output)
    assert match, output
    return Path(match.group(1))


def _irq_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("watch   | msix  v")]


@pytest.mark.slow
def test_demo_with_duration_shows_interrupts_and_cleans_up() -> None:
    with _demo("--duration", "1.5") as proc:
        out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "vfio-irqd status --socket" in out  # the banner tells what to try by hand
    assert "daemon.ready" in out
    assert "watch   | subscribed to msix 0-2" in out
    assert _irq_lines(out), out
    assert re.search(r"fire    \| fired msix: v0 \d+, v1 \d+, v2 \d+", out), out
    assert "watch   | shutdown:" in out
    assert re.search(r"demo    \| [1-9]\d* interrupts seen by watch", out), out
    assert not _workdir(out).exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_stops_cleanly_on_signal(sig: signal.Signals) -> None:
    proc = _demo()
    assert proc.stdout is not None
    lines = Lines(proc.stdout)
    try:
        # Wait (bounded) for the first interrupt to reach the watcher, then signal.
        while not _irq_lines("\n".join(lines.seen)):
            assert lines.next() is not None, "\n".join(lines.seen)
        proc.send_signal(sig)
        assert proc.wait(DEADLINE) == 0
        lines.rest()
    finally:
        reap(proc, lines)
    out = "\n".join(lines.seen)
    assert "demo    | stopping" in out
    assert "watch   | shutdown:" in out
    assert not _workdir(out).exists()
