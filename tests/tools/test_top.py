"""``vfio-irqd top``: the frame builder on canned stats, ``--once``, and the live view in tmux."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from irqd.tools.firing import fire
from irqd.tools.top import Sample, build_frame, client_rates, format_uptime, vector_rates
from irqproto.blocking import Client

from .helpers import DEADLINE, cli, env, irqd_argv, poll_until, require_tools, running_daemon

# -- the frame, on canned results --------------------------------------------------------------

INFO: dict[str, Any] = {
    "device": "0000:03:00.0",
    "backend": "vfio",
    "msix_strategy": "prearm",
    "msix": {"count": 64, "flags": 9, "noresize": True, "dynamic": False, "active": True},
}


def stats(counts: dict[int, int], delivered: int, uptime: float = 62.0) -> dict[str, Any]:
    """A ``stats`` result: msix vectors with ``counts``, a datapath client and top itself."""
    return {
        "vectors": [
            {"index": "msix", "vector": v, "count": n, "subscribers": 1}
            for v, n in sorted(counts.items(), reverse=True)  # the frame sorts them
        ],
        "clients": [
            {
                "id": 3,
                "name": "datapath",
                "pid": 4321,
                "uid": 0,
                "vectors": [["msix", v] for v in counts],
                "pending": 7,
                "delivered": delivered,
            },
            {
                "id": 9,
                "name": "vfio-irqd top",
                "pid": 999,
                "uid": 0,
                "vectors": [],
                "pending": 0,
                "delivered": 0,
            },
        ],
        "dispatch": {"rounds": 10, "events": 20, "native": True},
        "latency_us": {"bounds": [1, 2, 4, 8], "counts": [0, 90, 9, 1]},
        "host_vectors": {"msix": 64, "msi": 0},
        "msix_strategy": "prearm",
        "uptime_s": uptime,
    }


def rows(frame_text: str, first: str) -> list[list[str]]:
    """The table rows of the frame (second cell a number) whose first cell is ``first``."""
    split = [line.split() for line in frame_text.splitlines()]
    return [cells for cells in split if cells[:1] == [first] and cells[1:2] and cells[1].isdigit()]


def totals(frame_text: str) -> dict[int, int]:
    """``{vector: TOTAL}`` of the msix rows of a frame."""
    return {int(r[1]): int(r[3]) for r in rows(frame_text, "msix")}


def test_frame_rates_totals_clients_and_strategy() -> None:
    before = Sample(100.0, INFO, stats({0: 1000, 1: 10, 2: 0}, delivered=1010))
    after = Sample(102.0, INFO, stats({0: 1400, 1: 12, 2: 0}, delivered=1412, uptime=64.0))
    frame = build_frame(after, before, own_pid=999)
    text = frame.text()
    lines = text.splitlines()
    assert lines[0] == "vfio-irqd top   0000:03:00.0 (vfio)   up 1m04s"
    assert lines[1] == (
        "msix strategy prearm   table 64 (noresize)   host vectors allocated: msi 0, msix 64"
    )
    assert lines[2] == "interrupts 201.0/s   total 1412   pending 7   latency p50<=2us p99<=4us"
    # index, vector, rate/s, total, subscribers; in vector order
    assert rows(text, "msix") == [
        ["msix", "0", "200.0", "1400", "1"],
        ["msix", "1", "1.0", "12", "1"],
        ["msix", "2", "0.0", "0", "1"],
    ]
    # top's own connection (own_pid) is left out
    assert "CLIENTS 1" in lines
    [client] = [line.split() for line in lines if "datapath" in line]
    assert client == ["3", "datapath", "4321", "0", "7", "1412", "201.0", "msix", "0-2"]
    assert "vfio-irqd top" not in text.split("CLIENTS")[1]
    assert {lines[i] for i in frame.headings} >= {lines[0], "VECTORS 3", "CLIENTS 1"}


def test_first_frame_has_no_rates_yet() -> None:
    text = build_frame(Sample(1.0, INFO, stats({5: 3}, delivered=3))).text()
    assert "interrupts -/s   total 3" in text
    assert rows(text, "msix") == [["msix", "5", "-", "3", "1"]]
    assert "CLIENTS 2" in text  # no own_pid: every connection is shown


def test_rates_survive_counter_resets_and_new_vectors() -> None:
    # Vector 0 was released and enabled again (its count restarts at enable);
    # vector 1 is new. Both count from zero over the interval, never negative.
    before = Sample(10.0, INFO, stats({0: 500}, delivered=500))
    after = Sample(10.5, INFO, stats({0: 20, 1: 5}, delivered=30))
    assert vector_rates(before, after) == {("msix", 0): 40.0, ("msix", 1): 10.0}
    assert client_rates(before, after) == {3: 60.0, 9: 0.0}
    # No time passed: no rates rather than a division by zero.
    assert vector_rates(after, after) == {}


def test_frame_fits_a_small_terminal() -> None:
    many = Sample(5.0, INFO, stats(dict.fromkeys(range(40), 1), delivered=40))
    frame = build_frame(many, None, width=60, height=16, hint="q quits")
    assert len(frame.lines) <= 16
    assert all(len(line) <= 60 for line in frame.lines)
    assert frame.lines[0].endswith("   q quits")
    assert len(frame.lines[0]) == 60
    # Too narrow for the hint: the device's name matters more.
    narrow = build_frame(many, None, width=50, hint="q quits")
    assert narrow.lines[0] == "vfio-irqd top   0000:03:00.0 (vfio)   up 1m02s"
    text = frame.text()
    assert "VECTORS 40" in text
    assert "more vectors (vfio-irqd top --once lists all)" in text
    # the clients keep their rows while the vectors give way
    assert "datapath" in text


def test_frame_without_vectors_or_clients() -> None:
    empty = {"vectors": [], "clients": [], "host_vectors": {}, "msix_strategy": "dynamic"}
    text = build_frame(Sample(0.0, {"device": "sim", "backend": "sim"}, empty)).text()
    assert "(no vectors enabled)" in text
    assert "(no clients)" in text
    assert "host vectors allocated: none" in text
    assert "latency -" in text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59.9, "59s"),
        (61, "1m01s"),
        (3600 * 2 + 300, "2h05m"),
        (86400 * 4 + 7200, "4d02h"),
    ],
)
def test_format_uptime(seconds: float, text: str) -> None:
    assert format_uptime(seconds) == text


# -- against a real daemon ---------------------------------------------------------------------


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    """A simulated-device daemon's socket."""
    path = tmp_path / "irqd.sock"
    with running_daemon(path):
        yield path


def raise_irqs(sock: Path, vectors: list[int], count: int) -> None:
    """Fire ``count`` interrupts on each vector (they need a subscriber)."""
    with Client(str(sock), client_name="test-firer") as client:
        fds = client.sim_eventfds("msix", vectors)
    try:
        fire(list(zip(vectors, fds, strict=True)), count=count)
    finally:
        for fd in fds:
            os.close(fd)


def test_once_prints_a_plain_frame(sock: Path) -> None:
    with Client(str(sock), client_name="test-subscriber") as sub:
        sub.subscribe("msix", [0, 1])
        raise_irqs(sock, [0, 1], 9)
        poll_until(
            lambda: sum(v["count"] for v in sub.stats()["vectors"]) == 18, "interrupts counted"
        )
        result = cli("top", "--once", "--interval", "0.05", "--socket", str(sock))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "\x1b" not in text  # plain text, no terminal control sequences
    assert text.startswith("vfio-irqd top   sim (sim)")
    assert "msix strategy dynamic" in text
    assert [r[:2] + r[3:] for r in rows(text, "msix")] == [
        ["msix", "0", "9", "1"],
        ["msix", "1", "9", "1"],
    ]
    assert "test-subscriber" in text
    assert "vfio-irqd top" not in text.split("CLIENTS")[1]  # its own connection is left out


def test_once_measures_a_rate(sock: Path) -> None:
    with Client(str(sock), client_name="test-subscriber") as sub:
        sub.subscribe("msix", [3])
        # An unbounded load generator, started and seen counting before top reads.
        firer = subprocess.Popen(
            irqd_argv("sim", "fire", "--socket", str(sock), "--rate", "200", "--count", "0", "3"),
            stdout=subprocess.DEVNULL,
            env=env(),
        )
        try:
            poll_until(lambda: sub.stats()["vectors"][0]["count"] > 0, "the first interrupt")
            result = cli("top", "--once", "--interval", "0.3", "--socket", str(sock))
        finally:
            firer.terminate()
            firer.wait(DEADLINE)
    assert result.returncode == 0, result.stderr
    [row] = rows(result.stdout, "msix")
    assert float(row[2]) > 0


def test_live_view_needs_a_terminal(sock: Path) -> None:
    result = cli("top", "--socket", str(sock))  # stdout is a pipe here
    assert result.returncode == 2
    assert "--once" in result.stderr


def test_top_without_daemon(tmp_path: Path) -> None:
    result = cli("top", "--once", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1
    assert "no daemon is listening" in result.stderr


# -- the live view in a real terminal: tmux ----------------------------------------------------


class Tmux:
    """A private tmux server with one detached session."""

    def __init__(self, tmp_path: Path, command: list[str], width: int, height: int) -> None:
        conf = tmp_path / "tmux.conf"
        # A plain terminal type, as over ssh; the pane stays after top exits,
        # so that what it printed last can be read.
        conf.write_text('set -g default-terminal "screen"\nset -g remain-on-exit on\n')
        # Its own server socket in the test's directory: no other tmux is
        # touched, and nothing is left behind in /tmp/tmux-UID.
        self.base = ["tmux", "-S", str(tmp_path / "tmux.sock"), "-f", str(conf)]
        # tmux runs the command with sh -c; the shell writes top's exit status
        # down (tmux's own #{pane_dead_status} is not reliably filled in).
        self.status_file = tmp_path / "top.status"
        shell = f"{shlex.join(command)}; echo $? > {shlex.quote(str(self.status_file))}"
        self.run(
            "new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height), shell
        )  # fmt: skip

    def run(self, *args: str) -> str:
        """A tmux command's output; fails the test on an error."""
        result = subprocess.run(
            [*self.base, *args],
            capture_output=True,
            text=True,
            env=env(),
            timeout=DEADLINE,
            check=False,
        )
        assert result.returncode == 0, f"tmux {' '.join(args)}: {result.stderr}"
        return result.stdout

    def screen(self, *, history: bool = False) -> str:
        """What the pane shows now; with ``history``, also what scrolled off the top."""
        return self.run("capture-pane", "-p", "-t", "top", *(["-S", "-"] if history else []))

    def wait_for(self, text: str, *, history: bool = False) -> str:
        """The screen once it shows ``text``."""
        last = ""

        def shows() -> bool:
            nonlocal last
            last = self.screen(history=history)
            return text in last

        try:
            poll_until(shows, f"{text!r} on the screen")
        except TimeoutError:
            raise AssertionError(f"{text!r} never appeared; the screen:\n{last}") from None
        return last

    def exit_status(self) -> int:
        """top's exit status, once it has exited."""

        def written() -> str | None:
            text = self.status_file.read_text() if self.status_file.exists() else ""
            return text if text.endswith("\n") else None

        return int(poll_until(written, "top to exit"))

    def kill(self) -> None:
        """Stop this private server (and anything still running in it)."""
        subprocess.run(
            [*self.base, "kill-server"], capture_output=True, timeout=DEADLINE, check=False
        )


@contextlib.contextmanager
def tmux_top(tmp_path: Path, sock: Path, width: int = 100, height: int = 30) -> Iterator[Tmux]:
    """``vfio-irqd top --interval 0.1`` in a fresh tmux session."""
    require_tools("tmux")
    term = Tmux(
        tmp_path, irqd_argv("top", "--interval", "0.1", "--socket", str(sock)), width, height
    )
    try:
        yield term
    finally:
        term.kill()


def test_live_view_refreshes_and_quits_on_q(sock: Path, tmp_path: Path) -> None:
    with Client(str(sock), client_name="tmux-subscriber") as sub, tmux_top(tmp_path, sock) as term:
        sub.subscribe("msix", [0, 1])
        raise_irqs(sock, [0, 1], 7)
        screen = term.wait_for("tmux-subscriber")
        assert "q quits" in screen.splitlines()[0]
        assert "msix strategy dynamic" in screen
        poll_until(lambda: totals(term.screen()) == {0: 7, 1: 7}, "totals of 7")
        # More interrupts: the next refreshes show the new totals.
        raise_irqs(sock, [1], 5)
        poll_until(lambda: totals(term.screen()) == {0: 7, 1: 12}, "a total of 12")
        term.run("send-keys", "-t", "top", "q")
        assert term.exit_status() == 0


def test_live_view_quits_on_ctrl_c_and_fits_a_small_window(sock: Path, tmp_path: Path) -> None:
    with (
        Client(str(sock), client_name="tmux-subscriber") as sub,
        tmux_top(tmp_path, sock, 60, 14) as term,
    ):
        sub.subscribe("msix", list(range(30)))
        screen = term.wait_for("more vectors")
        lines = screen.splitlines()
        assert len(lines) <= 14
        assert all(len(line) <= 60 for line in lines)
        # A bigger window shows every vector.
        term.run("resize-window", "-t", "top", "-x", "100", "-y", "50")
        term.wait_for("msix       29")
        term.run("send-keys", "-t", "top", "C-c")
        assert term.exit_status() == 0


def test_live_view_says_when_the_daemon_goes_away(tmp_path: Path) -> None:
    path = tmp_path / "short.sock"
    with running_daemon(path) as daemon, tmux_top(tmp_path, path) as term:
        term.wait_for("CLIENTS 0")
        daemon.send_signal(signal.SIGTERM)
        assert term.exit_status() == 1
        # curses has given the screen back, and the reason is on it.
        term.wait_for("vfio-irqd: the daemon closed the connection", history=True)
        # The daemon stops by itself (closing the connection comes before its
        # exit, so without this wait running_daemon could SIGINT it late).
        assert daemon.wait(DEADLINE) == 0
