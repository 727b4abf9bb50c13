"""Fleet metrics: the Prometheus exposition of ``stats`` (irqd.metrics, docs/metrics.md).

Every output is read back with ``prometheus_client.parser``, the official
client library's own parser, not with one of ours.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from irqd.metrics import exposition, metrics_loop, write_atomically
from irqproto.blocking import Client
from irqproto.notifications import IrqNotification

from .helpers import DEADLINE, cli, poll_until, running_daemon

#: Sample values by (sample name, sorted labels without ``device``).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str, device: str = "sim") -> Samples:
    """Every sample of an exposition; each must carry ``device``."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("device") == device, sample
            key = (sample.name, tuple(sorted(labels.items())))
            assert key not in out, f"{key} twice"
            out[key] = sample.value
    return out


def families(text: str) -> dict[str, str]:
    """The families of an exposition: name to type."""
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def stats_result(**changes: Any) -> dict[str, Any]:
    """A ``stats`` result as docs/protocol.md describes it."""
    stats: dict[str, Any] = {
        "vectors": [
            {"index": "msix", "vector": 3, "count": 30, "subscribers": 2, "claimed_by": None},
            {"index": "msix", "vector": 0, "count": 7, "subscribers": 0, "claimed_by": 4},
            {"index": "intx", "vector": 0, "count": 1, "subscribers": 1, "claimed_by": None},
        ],
        "clients": [
            {
                "id": 9,
                "name": None,
                "pid": 2,
                "uid": 0,
                "vectors": [],
                "claims": [],
                "pending": 0,
                "delivered": 5,
                "dma_bytes": 0,
            },
            {
                "id": 4,
                "name": "nvme",
                "pid": 1,
                "uid": 0,
                "vectors": [["msix", 3]],
                "claims": [["msix", 0]],
                "pending": 6,
                "delivered": 24,
                "dma_bytes": 8192,
            },
        ],
        "dispatch": {
            "rounds": 11,
            "events": 12,
            "native": True,
            "hot_loop": "native",
            "hot_rounds": 99,
        },
        "latency_us": {"bounds": [1, 2, 4], "counts": [1, 2, 4]},
        "host_vectors": {"msix": 4, "msi": 0},
        "msix_strategy": "dynamic",
        "uptime_s": 12.5,
        "dma": {"bytes": 8192, "mappings": 2},
    }
    stats.update(changes)
    return stats


# -- the exposition of one stats result ------------------------------------------------------


def test_every_documented_family_with_its_type() -> None:
    got = families(exposition(stats_result(), "sim").decode())
    assert got == {
        "vfio_irqd_interrupts": "counter",
        "vfio_irqd_vector_subscribers": "gauge",
        "vfio_irqd_vector_claimed": "gauge",
        "vfio_irqd_vectors_enabled": "gauge",
        "vfio_irqd_host_vectors": "gauge",
        "vfio_irqd_clients": "gauge",
        "vfio_irqd_pending": "gauge",
        "vfio_irqd_client_delivered": "counter",
        "vfio_irqd_client_pending": "gauge",
        "vfio_irqd_client_dma_bytes": "gauge",
        "vfio_irqd_hot_loop_rounds": "counter",
        "vfio_irqd_dispatch_rounds": "counter",
        "vfio_irqd_dispatch_events": "counter",
        "vfio_irqd_delivery_latency_seconds": "histogram",
        "vfio_irqd_dma_bytes": "gauge",
        "vfio_irqd_dma_mappings": "gauge",
        "vfio_irqd_handovers": "counter",
        "vfio_irqd_crash_recoveries": "counter",
        "vfio_irqd_uptime_seconds": "gauge",
        "vfio_irqd_info": "gauge",
    }
    # Every family is documented, under its exposed name.
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    for name, kind in got.items():
        exposed = f"{name}_total" if kind == "counter" else name
        assert f"`{exposed}`" in doc, exposed


def test_the_values_come_from_the_stats_result() -> None:
    samples = parse(exposition(stats_result(), "0000:03:00.0").decode(), "0000:03:00.0")
    assert samples[("vfio_irqd_interrupts_total", (("index", "msix"), ("vector", "3")))] == 30
    assert samples[("vfio_irqd_interrupts_total", (("index", "intx"), ("vector", "0")))] == 1
    assert samples[("vfio_irqd_vector_claimed", (("index", "msix"), ("vector", "0")))] == 1
    assert samples[("vfio_irqd_vector_subscribers", (("index", "msix"), ("vector", "3")))] == 2
    enabled = {k[1][0][1]: v for k, v in samples.items() if k[0] == "vfio_irqd_vectors_enabled"}
    assert enabled == {"intx": 1, "msi": 0, "msix": 2}
    host = {k[1][0][1]: v for k, v in samples.items() if k[0] == "vfio_irqd_host_vectors"}
    assert host == {"intx": 0, "msi": 0, "msix": 4}
    assert samples[("vfio_irqd_clients", ())] == 2
    assert samples[("vfio_irqd_pending", ())] == 6
    nvme = (("client", "4"), ("name", "nvme"))
    assert samples[("vfio_irqd_client_delivered_total", nvme)] == 24
    assert samples[("vfio_irqd_client_pending", nvme)] == 6
    assert samples[("vfio_irqd_client_dma_bytes", nvme)] == 8192
    assert samples[("vfio_irqd_client_delivered_total", (("client", "9"), ("name", "")))] == 5
    assert samples[("vfio_irqd_hot_loop_rounds_total", (("hot_loop", "native"),))] == 99
    assert samples[("vfio_irqd_dispatch_rounds_total", ())] == 11
    assert samples[("vfio_irqd_dispatch_events_total", ())] == 12
    assert samples[("vfio_irqd_dma_bytes", ())] == 8192
    assert samples[("vfio_irqd_dma_mappings", ())] == 2
    assert samples[("vfio_irqd_uptime_seconds", ())] == 12.5
    info = (("hot_loop", "native"), ("msix_strategy", "dynamic"))
    assert samples[("vfio_irqd_info", info)] == 1
    # Cumulative buckets in seconds; the wire's last bucket (also everything
    # slower) is only in +Inf.
    buckets = {
        dict(k[1])["le"]: v
        for k, v in samples.items()
        if k[0] == "vfio_irqd_delivery_latency_seconds_bucket"
    }
    assert buckets == {"1e-06": 1, "2e-06": 3, "+Inf": 7}


def test_handovers_and_crashes_default_to_zero_and_are_read_when_reported() -> None:
    before = parse(exposition(stats_result(), "sim").decode())
    assert before[("vfio_irqd_handovers_total", ())] == 0
    assert before[("vfio_irqd_crash_recoveries_total", ())] == 0
    lifecycle = {"handovers": 3, "crash_recoveries": 1}
    after = parse(exposition(stats_result(lifecycle=lifecycle), "sim").decode())
    assert after[("vfio_irqd_handovers_total", ())] == 3
    assert after[("vfio_irqd_crash_recoveries_total", ())] == 1


def test_the_python_hot_loop_is_the_dispatch_loop() -> None:
    dispatch = {"rounds": 40, "events": 41, "native": False, "hot_loop": "python"}
    samples = parse(exposition(stats_result(dispatch=dispatch), "sim").decode())
    assert samples[("vfio_irqd_hot_loop_rounds_total", (("hot_loop", "python"),))] == 40


def test_the_same_stats_give_the_same_bytes() -> None:
    # The clients in another order (as a dict may come over the wire): same output.
    stats = stats_result()
    shuffled = stats_result(clients=stats["clients"][::-1], vectors=stats["vectors"][::-1])
    assert exposition(stats, "sim") == exposition(shuffled, "sim")


# -- the file ---------------------------------------------------------------------------------


def test_write_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "irqd.prom"
    path.write_bytes(b"old\n")
    old = path.stat().st_ino
    write_atomically(path, b"new\n")
    assert path.read_bytes() == b"new\n"
    assert path.stat().st_ino != old  # a new file renamed over, never rewritten in place
    assert os.listdir(tmp_path) == ["irqd.prom"]
    # node_exporter reads it as another user, whatever the daemon's umask.
    previous = os.umask(0o077)
    try:
        write_atomically(path, b"newer\n")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "irqd.prom"
    path.write_bytes(b"old\n")
    with pytest.raises(TypeError):
        write_atomically(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old\n"
    assert os.listdir(tmp_path) == ["irqd.prom"]


async def test_the_loop_writes_at_once_then_every_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "irqd.prom"
    send, receive = trio.open_memory_channel[float](10)
    stats = stats_result()

    def current() -> Mapping[str, Any]:
        send.send_nowait(trio.current_time())
        return stats

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(metrics_loop, current, "sim", lambda: (path, 5.0))
        times = [await receive.receive() - start for _ in range(3)]
        assert times == [0.0, 5.0, 10.0]
        # By the third reading the second write is done.
        assert path.read_bytes() == exposition(stats, "sim")
        nursery.cancel_scope.cancel()


async def test_a_failing_write_is_logged_once_per_streak_and_never_stops_the_loop(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    good = tmp_path / "irqd.prom"
    bad = tmp_path / "missing" / "irqd.prom"
    where = [bad]
    send, receive = trio.open_memory_channel[None](10)

    def current() -> Mapping[str, Any]:
        send.send_nowait(None)
        return stats_result()

    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            # Each round asks for the file, reads the stats, then writes.
            nursery.start_soon(metrics_loop, current, "sim", lambda: (where[0], 1.0))
            for _ in range(4):
                await receive.receive()
            # Four rounds aimed at the missing directory; the next ones at a good one.
            where[0] = good
            for _ in range(3):  # the third reading comes after the second good write
                await receive.receive()
            failed = [e for e in logs if e["event"] == "metrics.write_failed"]
            assert len(failed) == 1 and failed[0]["path"] == str(bad)
            assert failed[0]["log_level"] == "warning"
            assert "No such file or directory" in failed[0]["error"]
            nursery.cancel_scope.cancel()
    assert good.exists()
    recovered = [e for e in logs if e["event"] == "metrics.write_recovered"]
    assert [(e["failures"], e["path"]) for e in recovered] == [(4, str(good))]


async def test_no_file_wanted_writes_nothing_until_one_is(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "irqd.prom"
    wanted: list[Path | None] = [None]
    readings: list[float] = []

    def current() -> Mapping[str, Any]:
        readings.append(trio.current_time())
        return stats_result()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(metrics_loop, current, "sim", lambda: (wanted[0], 2.0))
        await trio.sleep(7)
        assert readings == [] and not path.exists()
        wanted[0] = path  # as a reload would
        await trio.sleep(2)
        assert len(readings) == 1
        nursery.cancel_scope.cancel()
    assert path.exists()


# -- against a running daemon ---------------------------------------------------------------


@pytest.fixture(params=["native", "python"])
def daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, Path]]:
    """A simulated-device daemon writing its metrics file every 50 ms: (socket, file)."""
    sock, prom = tmp_path / "irqd.sock", tmp_path / "prom" / "irqd.prom"
    prom.parent.mkdir()
    flags = ("--metrics-file", str(prom), "--metrics-interval", "0.05")
    with running_daemon(sock, *flags, "--hot-loop", request.param):
        poll_until(prom.exists, "the first metrics file")
        yield sock, prom
    # Whatever the daemon was doing when it stopped, no temporary file is left.
    assert os.listdir(prom.parent) == ["irqd.prom"]


def fire_and_receive(sock: Path, client: Client, fired: dict[int, int]) -> None:
    """Fire ``fired`` (vector to count) on msix and wait until ``client`` got every one."""
    with Client(str(sock), client_name="firer") as firer:
        fds = firer.sim_eventfds("msix", list(fired))
    try:
        for fd, count in zip(fds, fired.values(), strict=True):
            os.write(fd, count.to_bytes(8, "little"))
    finally:
        for fd in fds:
            os.close(fd)
    got = dict.fromkeys(fired, 0)
    while got != fired:
        note = client.next_notification(timeout=DEADLINE)
        assert isinstance(note, IrqNotification)
        for vector, count in note.counts:
            got[vector] += count


def read_file(path: Path) -> tuple[int, str]:
    """The inode and the whole content of ``path``, from one open."""
    with path.open() as f:
        return os.fstat(f.fileno()).st_ino, f.read()


def test_the_file_counts_exactly_what_was_fired(daemon: tuple[Path, Path]) -> None:
    sock, prom = daemon
    fired = {0: 1000, 1: 37, 5: 1}
    with (
        Client(str(sock), client_name="datapath") as datapath,
        Client(str(sock), client_name="monitor") as monitor,
    ):
        datapath.subscribe("msix", list(fired))
        monitor.subscribe("msix", [1])
        fire_and_receive(sock, datapath, fired)

        def settled() -> Samples | None:
            # "delivered": sent to the client's socket, read by it or not.
            samples = parse(read_file(prom)[1])
            delivered = {
                dict(k[1])["name"]: v
                for k, v in samples.items()
                if k[0] == "vfio_irqd_client_delivered_total"
            }
            return samples if delivered == {"datapath": 1038, "monitor": 37} else None

        samples = poll_until(settled, "the file to show every delivered count")
    for vector, count in fired.items():
        key = ("vfio_irqd_interrupts_total", (("index", "msix"), ("vector", str(vector))))
        assert samples[key] == count
    subscribers = {
        dict(k[1])["vector"]: v
        for k, v in samples.items()
        if k[0] == "vfio_irqd_vector_subscribers"
    }
    assert subscribers == {"0": 1, "1": 2, "5": 1}
    assert samples[("vfio_irqd_clients", ())] == 2
    assert samples[("vfio_irqd_pending", ())] == 0
    assert samples[("vfio_irqd_vectors_enabled", (("index", "msix"),))] == 3
    assert samples[("vfio_irqd_host_vectors", (("index", "msix"),))] == 3
    hot = [v for k, v in samples.items() if k[0] == "vfio_irqd_hot_loop_rounds_total"]
    assert len(hot) == 1 and hot[0] >= 1
    assert samples[("vfio_irqd_handovers_total", ())] == 0
    assert samples[("vfio_irqd_delivery_latency_seconds_bucket", (("le", "+Inf"),))] > 0


def test_the_metrics_command_prints_what_the_file_has(daemon: tuple[Path, Path]) -> None:
    sock, prom = daemon
    with Client(str(sock), client_name="datapath") as datapath:
        datapath.subscribe("msix", [2])
        fire_and_receive(sock, datapath, {2: 500})
        result = cli("metrics", "--socket", str(sock))

        def without_the_command() -> str | None:
            # A file written while the command was connected counts it; the next does not.
            text = read_file(prom)[1]
            return text if parse(text)[("vfio_irqd_clients", ())] == 1 else None

        from_file = poll_until(without_the_command, "a rewrite after the command left")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    printed = parse(result.stdout)
    written = parse(from_file)
    # The same series; the same values except those that move with time alone.
    assert printed.keys() == written.keys()
    moving = (
        "vfio_irqd_uptime_seconds",
        "vfio_irqd_hot_loop_rounds_total",
        "vfio_irqd_dispatch_rounds_total",
        "vfio_irqd_dispatch_events_total",
    )
    differ = {k for k in printed if printed[k] != written[k] and k[0] not in moving}
    assert differ == set()
    # The command's own connection is not among the clients.
    assert printed[("vfio_irqd_clients", ())] == 1
    assert printed[("vfio_irqd_interrupts_total", (("index", "msix"), ("vector", "2")))] == 500


def test_a_reader_never_sees_a_partial_file(daemon: tuple[Path, Path]) -> None:
    _, prom = daemon
    # The file system may give a freed inode number to the next file, so count
    # changes of inode from one read to the next, not distinct inodes.
    last, changes, reads = read_file(prom)[0], 0, 0
    deadline = time.monotonic() + DEADLINE
    # Read as fast as we can: a reader racing the writer is what could see half
    # a file (a writer that truncated and rewrote in place would show an empty
    # or cut-off file here, even with the same content every time).
    while changes < 20:
        assert time.monotonic() < deadline, f"only {changes} rewrites seen"
        inode, text = read_file(prom)
        reads += 1
        # Whole: it parses, and its last family is there.
        assert text.endswith("\n") and "vfio_irqd_info{" in text
        parse(text)
        changes += inode != last
        last = inode
    assert reads > changes  # files were read more than once each, whole every time


def test_a_reload_moves_the_file_the_config_names(tmp_path: Path) -> None:
    sock, config = tmp_path / "irqd.sock", tmp_path / "irqd.toml"
    first, second = tmp_path / "first.prom", tmp_path / "second.prom"
    config.write_text(f'[metrics]\nfile = "{first}"\ninterval = 0.05\n')
    with running_daemon(sock, "--config", str(config)) as proc:
        poll_until(first.exists, "the file the config names")
        config.write_text(f'[metrics]\nfile = "{second}"\ninterval = 0.05\n')
        proc.send_signal(signal.SIGHUP)
        poll_until(second.exists, "the file the reloaded config names")
        assert parse(second.read_text())[("vfio_irqd_clients", ())] == 0


def test_the_metrics_command_without_a_daemon_says_so(tmp_path: Path) -> None:
    result = cli("metrics", "--socket", str(tmp_path / "nobody.sock"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "no daemon is listening on" in result.stderr
    assert str(tmp_path / "nobody.sock") in result.stderr
