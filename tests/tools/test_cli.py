"""The ``vfio-irqd`` command line, against real daemon processes on real sockets.

Nothing here waits a fixed time: every wait polls a condition up to a deadline.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from irqd.logsetup import configure_logging
from irqd.tools.cli import build_parser, main, normalize_bdf
from irqd.tools.demo import wait_for_socket
from irqd.tools.firing import fire
from irqd.tools.render import format_irq, format_ranges
from irqproto.blocking import Client

from .helpers import (
    DEADLINE,
    Lines,
    cli,
    env,
    irqd_argv,
    poll_until,
    reap,
    running_daemon,
    stop,
)

# -- helpers -------------------------------------------------------------------------------


#: Children started by ``spawn`` in the running test, with the line readers of
#: their stdout; ``_reap_children`` ends them and closes their pipes.
_children: list[tuple[subprocess.Popen[str], list[Lines]]] = []


def spawn(*args: str) -> subprocess.Popen[str]:
    """Start ``python -m irqd ARGS`` with stdout and stderr piped."""
    proc = subprocess.Popen(
        irqd_argv(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    _children.append((proc, []))
    return proc


def read_lines(proc: subprocess.Popen[str]) -> Lines:
    """A reader of ``proc``'s stdout, closed with it after the test."""
    assert proc.stdout is not None
    lines = Lines(proc.stdout)
    for child, readers in _children:
        if child is proc:
            readers.append(lines)
    return lines


@pytest.fixture(autouse=True)
def _reap_children() -> Iterator[None]:
    """After each test: every child stopped, every reader at end of stream, every pipe closed."""
    yield
    while _children:
        proc, readers = _children.pop()
        reap(proc, *readers)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Path]:
    """A ``serve --sim`` subprocess on a private socket; yields the socket path."""
    sock = tmp_path / "irqd.sock"
    with running_daemon(sock):
        yield sock
    assert not sock.exists()


def start_watch(sock: Path, *args: str) -> tuple[subprocess.Popen[str], Lines]:
    """``watch --json ARGS``, returned once its ``subscribed`` line has arrived."""
    proc = spawn("watch", "--socket", str(sock), "--json", *args)
    assert proc.stdout is not None
    lines = read_lines(proc)
    first = lines.next()
    assert first is not None, proc.communicate()[1] if proc.poll() is not None else "no output"
    assert json.loads(first)["event"] == "subscribed"
    return proc, lines


# -- --help and argument errors (in-process: argparse only) --------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["serve", "watch", "status", "sim", "examples:"]),
        (
            ["serve"],
            [
                "--device",
                "--sim",
                "--sim-vectors",
                "--sim-noresize",
                "--sim-msi-vectors",
                "--msix-strategy",
                "--msix-prearm",
                "--socket-mode",
                "--log-level",
                "--log-format",
                "--socket",
                "VFIO_IRQD_SOCKET",
                "examples:",
            ],
        ),
        (["watch"], ["INDEX", "VECTOR", "--json", "--count", "--timeout", "--socket", "examples:"]),
        (["status"], ["--json", "--socket", "examples:"]),
        (["sim"], ["fire"]),
        (["sim", "fire"], ["--index", "--count", "--rate", "VECTOR", "--socket", "examples:"]),
    ],
)
def test_help(argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in expected:
        assert word in out, f"{word!r} missing from {' '.join(argv)} --help"


def test_python_dash_m_and_version() -> None:
    result = cli("--help")
    assert result.returncode == 0
    assert "usage: vfio-irqd" in result.stdout
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("vfio-irqd ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["serve", "--sim-vectors", "0"], "out of range (1..2048)"),
        (["serve", "--sim-vectors", "2049"], "out of range (1..2048)"),
        (["serve", "--sim-vectors", "many"], "not an integer"),
        (["serve", "--sim-msi-vectors", "33"], "out of range (1..32)"),
        (["serve", "--msix-strategy", "fast"], "invalid choice"),
        (["serve", "--msix-prearm", "65"], "exceeds the MSI-X table"),
        (["serve", "--msix-prearm", "4", "--msix-strategy", "grow"], "only applies to"),
        (["serve", "--sim-noresize", "--msix-strategy", "dynamic"], "NORESIZE"),
        (["serve", "--socket-mode", "8"], "octal"),
        (["serve", "--socket-mode", "1777"], "out of range"),
        (["serve", "--log-level", "loud"], "invalid choice"),
        (["serve", "--hot-loop", "fast"], "invalid choice"),
        (["serve", "--device", "nope"], "not a PCI address"),
        (["serve", "--device", "03:00.0", "--sim"], "not allowed with"),
        (["serve", "--device", "03:00.0", "--sim-vectors", "4"], "only for the simulated device"),
        (["watch", "msix"], "required: VECTOR"),
        (["watch", "bogus", "1"], "invalid choice"),
        (["watch", "msix", "-1"], "VECTOR"),
        (["watch", "--count", "0", "msix", "1"], "out of range"),
        (["watch", "--timeout", "-1", "msix", "1"], "positive"),
        (["sim"], "required: SIMCOMMAND"),
        (["sim", "fire"], "required: VECTOR"),
        (["sim", "fire", "--rate", "0", "1"], "positive"),
        (["sim", "fire", "--count", "-1", "1"], "out of range"),
        (["status", "--device", "1:2:3"], "not a PCI address"),
    ],
)
def test_bad_arguments_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: vfio-irqd" in err
    assert message in err


def test_parser_defaults() -> None:
    # serve's overridable flags stay None: the config file fills them in, then
    # the built-in defaults (auto, 0660, info, auto) do; see tests/test_configfile.py.
    args = build_parser().parse_args(["serve"])
    assert (args.device, args.sim, args.msix_strategy, args.socket_mode, args.log_level) == (
        None,
        False,
        None,
        None,
        None,
    )
    args = build_parser().parse_args(["sim", "fire", "3"])
    assert (args.index, args.count, args.rate, args.vectors) == ("msix", 1, None, [3])


def test_small_formatters() -> None:
    assert normalize_bdf("03:00.0") == "0000:03:00.0"
    assert normalize_bdf("0000:AF:1F.7") == "0000:af:1f.7"
    assert format_ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert format_ranges([]) == "-"
    assert format_irq("msix", [(0, 3), (2, 1)], {0: 12, 2: 4}) == (
        "msix  v0 +3 (total 12)  v2 +1 (total 4)"
    )


# -- against a real daemon -----------------------------------------------------------------


@pytest.mark.slow
def test_fire_while_watching_counts_exactly(daemon: Path) -> None:
    watch, lines = start_watch(
        daemon, "--count", "200", "--timeout", str(DEADLINE), "msix", "0", "1"
    )
    try:
        fired = cli("sim", "fire", "--socket", str(daemon), "--count", "100", "0", "1")
        assert fired.returncode == 0, fired.stderr
        assert "v0 100, v1 100" in fired.stdout
        records = [json.loads(line) for line in lines.rest()]
        assert watch.wait(DEADLINE) == 0
    finally:
        stop(watch)
    irqs = [r for r in records if r["event"] == "irq"]
    assert irqs, records
    sums = {0: 0, 1: 0}
    for record in irqs:
        assert record["index"] == "msix"
        for entry in record["vectors"]:
            sums[entry["vector"]] += entry["count"]
            assert entry["total"] == sums[entry["vector"]]
    assert sums == {0: 100, 1: 100}


def test_watch_human_lines_and_shutdown(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    server = spawn("serve", "--sim", "--socket", str(sock), "--log-format", "json")
    watch: subprocess.Popen[str] | None = None
    try:
        wait_for_socket(sock, time.monotonic() + DEADLINE, alive=server)
        watch = spawn("watch", "--socket", str(sock), "msix", "4")
        assert watch.stdout is not None
        lines = read_lines(watch)
        assert (lines.next() or "").startswith("subscribed to msix 4")
        with Client(str(sock), client_name="test") as client:
            [fd] = client.sim_eventfds("msix", [4])
        try:
            fire([(4, fd)], count=3)
        finally:
            os.close(fd)
        total = 0
        while total < 3:
            line = lines.next() or ""
            assert line.startswith("msix  v4 +"), line
            total = int(line.rsplit("total ", 1)[1].rstrip(")"))
        assert total == 3
        # Stopping the daemon sends every client `shutdown`; watch prints it, exits 0.
        assert stop(server) == 0
        assert lines.rest() == ["shutdown: daemon stopping (SIGINT)"]
        assert watch.wait(DEADLINE) == 0
    finally:
        stop(server)
        if watch is not None:
            stop(watch)


def test_watch_stops_on_ctrl_c(daemon: Path) -> None:
    watch, lines = start_watch(daemon, "msix", "0")
    assert stop(watch, signal.SIGINT) == 0
    assert lines.rest() == []


def test_watch_exits_quietly_when_its_reader_leaves(daemon: Path) -> None:
    watch = spawn("watch", "--socket", str(daemon), "msix", "5")
    assert watch.stdout is not None
    # No reader thread here: readline returns once watch subscribed or exited.
    assert watch.stdout.readline().startswith("subscribed")
    watch.stdout.close()  # like `vfio-irqd watch ... | head -1` once head has its line
    with Client(str(daemon), client_name="test") as client:
        [fd] = client.sim_eventfds("msix", [5])
    try:
        # Keep interrupting until watch notices the closed pipe on a write.
        def exited() -> bool:
            os.eventfd_write(fd, 1)
            return watch.poll() is not None

        poll_until(exited, "watch to exit")
    finally:
        os.close(fd)
        stop(watch)
    assert watch.returncode == 0
    assert watch.stderr is not None
    assert watch.stderr.read() == ""


def test_watch_timeout(daemon: Path) -> None:
    plain = cli("watch", "--socket", str(daemon), "--timeout", "0.2", "msix", "0")
    assert plain.returncode == 0, plain.stderr
    short = cli("watch", "--socket", str(daemon), "--timeout", "0.2", "--count", "5", "msix", "0")
    assert short.returncode == 1
    assert "timed out after 0.2 s with 0 of 5 interrupts" in short.stderr


def test_status_json_and_table(daemon: Path) -> None:
    with Client(str(daemon), client_name="test-subscriber") as client:
        client.subscribe("msix", [0, 1])
        fds = client.sim_eventfds("msix", [0, 1])
        try:
            fire(list(zip([0, 1], fds, strict=True)), count=7)
        finally:
            for fd in fds:
                os.close(fd)

        def counted() -> dict[str, Any] | None:
            result = cli("status", "--json", "--socket", str(daemon))
            assert result.returncode == 0, result.stderr
            parsed: dict[str, Any] = json.loads(result.stdout)
            totals = {v["vector"]: v["count"] for v in parsed["stats"]["vectors"]}
            return parsed if totals == {0: 7, 1: 7} else None

        status = poll_until(counted, "both vectors counted")
        table = cli("status", "--socket", str(daemon))
    assert status["device"]["backend"] == "sim"
    assert status["device"]["msix"]["count"] == 64
    assert sorted(status["device"]["msix"]["enabled"]) == [0, 1]
    assert {(v["index"], v["vector"], v["subscribers"]) for v in status["stats"]["vectors"]} == {
        ("msix", 0, 1),
        ("msix", 1, 1),
    }
    assert any(c["name"] == "test-subscriber" for c in status["stats"]["clients"])
    # The default on a machine where the extension was built.
    assert status["stats"]["dispatch"]["hot_loop"] == "native"
    assert status["stats"]["dispatch"]["hot_rounds"] > 0
    assert table.returncode == 0, table.stderr
    for word in ("interrupt indexes", "msix", "vectors", "clients", "test-subscriber", "latency"):
        assert word in table.stdout
    assert "hot loop  native" in table.stdout


def test_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nobody.sock"
    for argv in (["status"], ["watch", "msix", "0"], ["sim", "fire", "0"]):
        result = cli(*argv, "--socket", str(missing))
        assert result.returncode == 1
        assert str(missing) in result.stderr
        assert "vfio-irqd serve" in result.stderr
        assert "Traceback" not in result.stderr


def test_socket_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFIO_IRQD_SOCKET", str(tmp_path / "env.sock"))
    assert main(["status"]) == 1  # in-process, so the environment applies


def test_daemon_error_is_reported_with_its_code(daemon: Path) -> None:
    # Vector 9 has no subscriber, hence no eventfd to hand out.
    result = cli("sim", "fire", "--socket", str(daemon), "9")
    assert result.returncode == 1
    assert "EINVAL" in result.stderr
    assert "Traceback" not in result.stderr


# -- firing --------------------------------------------------------------------------------


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_fire_writes_each_eventfd_count_times() -> None:
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
    try:
        result = fire([(v, fd) for v, fd in enumerate(fds)], count=250)
        assert result.written == ((0, 250), (1, 250), (2, 250))
        assert result.total == 750
        assert not result.stopped
        assert [_drain(fd) for fd in fds] == [250, 250, 250]
    finally:
        for fd in fds:
            os.close(fd)


def test_fire_paces_and_stops_between_rounds() -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        # 5 rounds at 100/s: the last is due 40 ms after the first.
        result = fire([(0, fd)], count=5, rate=100.0)
        assert result.written == ((0, 5),)
        assert result.elapsed_s >= 0.04
        assert _drain(fd) == 5

        calls = 0

        def after_three() -> bool:
            nonlocal calls
            calls += 1
            return calls > 3

        result = fire([(0, fd)], count=0, should_stop=after_three)
        assert result.stopped
        assert result.written == ((0, 3),)
        assert _drain(fd) == 3
    finally:
        os.close(fd)


def test_fire_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="count"):
        fire([], count=-1)
    with pytest.raises(ValueError, match="rate"):
        fire([], rate=0.0)


# -- logging -------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_logging_json_lines_when_not_a_terminal() -> None:
    out = io.StringIO()  # isatty() is False, like journald's stdout socket
    configure_logging("info", "auto", stream=out)
    log = structlog.get_logger("test")
    log.debug("hidden", x=1)
    log.info("vectors.enabled", index="msix", vectors=[0, 1])
    logging.getLogger("somelib").warning("from the stdlib %s", "too")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["vectors.enabled", "from the stdlib too"]
    first = records[0]
    assert (first["level"], first["index"], first["vectors"]) == ("info", "msix", [0, 1])
    assert first["timestamp"].endswith("Z")  # ISO 8601, UTC
    assert records[1]["level"] == "warning"


def _raise_value_error() -> None:
    raise ValueError("boom")


@pytest.mark.usefixtures("restore_logging")
def test_logged_tracebacks_are_one_json_line_without_locals() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    secret = "client-data-that-must-not-leak"  # a local of a frame in the traceback
    try:
        _raise_value_error()
    except ValueError:
        structlog.get_logger("test").exception("client.crashed")
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["exception"][0]["exc_type"] == "ValueError"
    assert secret not in line
    assert all("locals" not in frame for frame in record["exception"][0]["frames"])


@pytest.mark.usefixtures("restore_logging")
def test_logging_console_and_levels() -> None:
    out = io.StringIO()
    configure_logging("warning", "console", stream=out)
    log = structlog.get_logger("test")
    log.info("quiet")
    log.warning("loud", reason="test")
    text = out.getvalue()
    assert "quiet" not in text
    assert "loud" in text
    assert "reason" in text
    assert not text.lstrip().startswith("{")


@pytest.mark.usefixtures("restore_logging")
def test_logging_filters_before_processors() -> None:
    configure_logging("error", "json", stream=io.StringIO())
    log = structlog.get_logger("test")
    with structlog.testing.capture_logs() as logs:
        log.warning("dropped")
        log.error("kept", code="EINVAL")
    assert logs == [{"event": "kept", "code": "EINVAL", "log_level": "error"}]


def test_logging_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("chatty")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")
