"""Fleet metrics in the Prometheus text exposition format (docs/metrics.md).

One pure function, :func:`exposition`, turns the ``stats`` result
(docs/protocol.md) into the exposition bytes; both the daemon's writer
(``serve --metrics-file``, :func:`metrics_loop`) and ``vfio-irqd metrics``
(which reads ``stats`` over the socket) call it, so both print the same.
The format itself is the official client library's (``prometheus_client``):
a private registry, one custom collector yielding metric families, and
``generate_latest``.

The file is written the way node_exporter's textfile collector expects
(its README, "Textfile Collector"): to a temporary file in the same
directory, then renamed over the old one, so a scrape never reads half a
file. ``prometheus_client.write_to_textfile`` does the rename but not the
``fsync``, so :func:`write_atomically` is our own: without it a power loss
after the rename can leave an empty file under the final name (ext4's
``auto_da_alloc`` covers only some cases; see the rename(2) man page on
atomicity and fsync(2) on durability).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from irqd.config import DEFAULT_METRICS_INTERVAL as DEFAULT_INTERVAL

__all__ = [
    "DEFAULT_INTERVAL",
    "DEVICE_INDEXES",
    "StatsCollector",
    "build_registry",
    "exposition",
    "metrics_loop",
    "write_atomically",
]

log = structlog.get_logger("irqd.metrics")

#: The device's interrupt indexes: each gets its per-index series even when it
#: has no vector enabled, so a dashboard sees a 0 rather than a missing series.
DEVICE_INDEXES = ("intx", "msi", "msix")

_PREFIX = "vfio_irqd_"


def _family_name(name: str) -> str:
    return _PREFIX + name


class StatsCollector(Collector):
    """A collector over one ``stats`` result: the same families every time it is collected."""

    def __init__(self, stats: Mapping[str, Any], device: str) -> None:
        """``stats``: the ``stats`` result; ``device``: the PCI address, or ``sim``."""
        self.stats = stats
        self.device = device

    def collect(self) -> Iterator[Metric]:
        """Every family, in the order docs/metrics.md lists them."""
        stats, device = self.stats, self.device
        yield from self._vectors(stats.get("vectors", ()), stats.get("host_vectors", {}))
        yield from self._clients(stats.get("clients", ()))
        yield from self._loops(stats.get("dispatch", {}))
        latency = stats.get("latency_us")
        if latency:
            yield self._latency(latency)
        dma = stats.get("dma", {})
        yield _gauge(
            "dma_bytes",
            "Bytes of DMA memory mapped for all clients together.",
            device,
            dma.get("bytes", 0),
        )
        yield _gauge(
            "dma_mappings",
            "DMA buffers mapped for all clients together.",
            device,
            dma.get("mappings", 0),
        )
        # A daemon from before ``lifecycle`` existed counted none, which is what 0 means.
        lifecycle = stats.get("lifecycle") or {}
        yield _counter(
            "handovers",
            "Hand-overs this instance went through (restart, SIGUSR2).",
            device,
            lifecycle.get("handovers", 0),
        )
        yield _counter(
            "crash_recoveries",
            "Times a daemon adopted the device after its predecessor died.",
            device,
            lifecycle.get("crash_recoveries", 0),
        )
        if "uptime_s" in stats:
            yield _gauge(
                "uptime_seconds",
                "Seconds since this daemon process started serving.",
                device,
                stats["uptime_s"],
            )
        info = GaugeMetricFamily(
            _family_name("info"),
            "Always 1; the labels say how the instance runs.",
            labels=["device", "msix_strategy", "hot_loop"],
        )
        info.add_metric(
            [
                device,
                str(stats.get("msix_strategy", "")),
                str(stats.get("dispatch", {}).get("hot_loop", "")),
            ],
            1,
        )
        yield info

    def _vectors(
        self, vectors: Sequence[Mapping[str, Any]], host: Mapping[str, int]
    ) -> Iterator[Metric]:
        labels = ["device", "index", "vector"]
        interrupts = CounterMetricFamily(
            _family_name("interrupts"),
            "Interrupts the daemon saw on the vector since it was enabled.",
            labels=labels,
        )
        subscribers = GaugeMetricFamily(
            _family_name("vector_subscribers"), "Clients subscribed to the vector.", labels=labels
        )
        claimed = GaugeMetricFamily(
            _family_name("vector_claimed"),
            "1 if a client claimed the vector (the daemon then does not see its interrupts).",
            labels=labels,
        )
        enabled: dict[str, int] = dict.fromkeys(DEVICE_INDEXES, 0)
        for v in sorted(vectors, key=lambda v: (str(v["index"]), int(v["vector"]))):
            key = [self.device, str(v["index"]), str(v["vector"])]
            interrupts.add_metric(key, v.get("count", 0))
            subscribers.add_metric(key, v.get("subscribers", 0))
            claimed.add_metric(key, 0 if v.get("claimed_by") is None else 1)
            enabled[str(v["index"])] = enabled.get(str(v["index"]), 0) + 1
        yield interrupts
        yield subscribers
        yield claimed
        per_index = GaugeMetricFamily(
            _family_name("vectors_enabled"),
            "Vectors with an eventfd assigned, per interrupt index.",
            labels=["device", "index"],
        )
        for index in sorted(enabled):
            per_index.add_metric([self.device, index], enabled[index])
        yield per_index
        host_vectors = GaugeMetricFamily(
            _family_name("host_vectors"),
            "Vectors allocated on the host per interrupt index (what prearm costs).",
            labels=["device", "index"],
        )
        for index in sorted(set(host) | set(DEVICE_INDEXES)):
            host_vectors.add_metric([self.device, index], host.get(index, 0))
        yield host_vectors

    def _clients(self, clients: Sequence[Mapping[str, Any]]) -> Iterator[Metric]:
        device = self.device
        yield _gauge("clients", "Clients connected to the daemon's socket.", device, len(clients))
        yield _gauge(
            "pending",
            "Interrupt counts queued for all clients together, not yet sent (the backlog).",
            device,
            sum(int(c.get("pending", 0)) for c in clients),
        )
        labels = ["device", "client", "name"]
        delivered = CounterMetricFamily(
            _family_name("client_delivered"),
            "Interrupt counts sent to the client in irq notifications since it connected.",
            labels=labels,
        )
        pending = GaugeMetricFamily(
            _family_name("client_pending"),
            "Interrupt counts queued for the client, not yet sent.",
            labels=labels,
        )
        dma = GaugeMetricFamily(
            _family_name("client_dma_bytes"),
            "Bytes of DMA memory the client holds.",
            labels=labels,
        )
        for c in sorted(clients, key=lambda c: int(c["id"])):
            key = [device, str(c["id"]), str(c.get("name") or "")]
            delivered.add_metric(key, c.get("delivered", 0))
            pending.add_metric(key, c.get("pending", 0))
            dma.add_metric(key, c.get("dma_bytes", 0))
        yield delivered
        yield pending
        yield dma

    def _loops(self, dispatch: Mapping[str, Any]) -> Iterator[Metric]:
        hot_loop = str(dispatch.get("hot_loop", "python"))
        # With the python hot loop the Trio dispatch loop is the hot loop;
        # with the native one its thread's wake-ups are reported apart.
        rounds = dispatch.get("hot_rounds") if hot_loop == "native" else None
        hot = CounterMetricFamily(
            _family_name("hot_loop_rounds"),
            "Wake-ups of the loop that forwards interrupts to the clients.",
            labels=["device", "hot_loop"],
        )
        hot.add_metric(
            [self.device, hot_loop], rounds if rounds is not None else dispatch.get("rounds", 0)
        )
        yield hot
        yield _counter(
            "dispatch_rounds",
            "Wake-ups of the daemon's Trio dispatch loop.",
            self.device,
            dispatch.get("rounds", 0),
        )
        yield _counter(
            "dispatch_events",
            "Eventfd events the Trio dispatch loop handled.",
            self.device,
            dispatch.get("events", 0),
        )

    def _latency(self, latency: Mapping[str, Sequence[int]]) -> Metric:
        bounds, counts = list(latency["bounds"]), list(latency["counts"])
        # The wire's last bucket also holds everything slower than its bound,
        # so it is not a "<= bound" bucket: it is left to +Inf.
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(bounds[:-1], counts, strict=False):
            running += count
            buckets.append((_seconds(bound), running))
        buckets.append(("+Inf", sum(counts)))
        family = HistogramMetricFamily(
            _family_name("delivery_latency_seconds"),
            "From reading a count off the eventfd to writing the irq notification carrying it.",
            labels=["device"],
        )
        # The daemon keeps no sum of latencies, so the histogram has no _sum.
        family.add_metric([self.device], buckets, sum_value=None)
        return family


def _seconds(microseconds: int) -> str:
    return f"{microseconds / 1_000_000:g}"


def _gauge(name: str, doc: str, device: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(_family_name(name), doc, labels=["device"])
    family.add_metric([device], value)
    return family


def _counter(name: str, doc: str, device: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(_family_name(name), doc, labels=["device"])
    family.add_metric([device], value)
    return family


def build_registry(stats: Mapping[str, Any], device: str) -> CollectorRegistry:
    """A private registry (no process or platform collectors) over one ``stats`` result."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats, device))
    return registry


def exposition(stats: Mapping[str, Any], device: str) -> bytes:
    """The text exposition (format 0.0.4) of one ``stats`` result for ``device``."""
    return generate_latest(build_registry(stats, device))


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new file, whole.

    A temporary file in the same directory (rename(2) is atomic only within
    one file system), named so the textfile collector, which reads only
    ``*.prom``, never picks it up; written, fsync'ed, renamed over ``path``.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            # Readable by all whatever the umask (the shipped unit has UMask=0077):
            # node_exporter reads it as its own user. Nothing in it is secret.
            os.fchmod(fd, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _render_and_write(path: Path, stats: Mapping[str, Any], device: str) -> None:
    write_atomically(path, exposition(stats, device))


async def metrics_loop(
    stats: Callable[[], Mapping[str, Any]],
    device: str,
    target: Callable[[], tuple[Path | None, float]],
) -> None:
    """Rewrite the metrics file now and then every interval, for as long as it runs.

    ``stats``: the current ``stats`` result; ``target``: the file (``None``:
    none wanted just now) and interval, asked again each round so that a
    reload can change them. A failure to write is logged once per streak of
    failures (and its end once), never raised: metrics must not stop the
    daemon.
    """
    failing: str | None = None
    failures = 0
    while True:
        path, interval = target()
        if path is not None:
            try:
                # The snapshot is taken here, on the Trio thread that owns the
                # daemon's state; it is a fresh tree of plain values. Building
                # the text (~0.1 s for 2048 vectors and 256 clients) and the
                # write with its fsync are not: the Trio thread serves the clients.
                await trio.to_thread.run_sync(_render_and_write, path, stats(), device)
            except Exception as exc:  # any failure: logged, and the daemon goes on
                failures += 1
                if failing is None:
                    log.warning("metrics.write_failed", path=str(path), error=str(exc))
                failing = str(path)
            else:
                if failing is not None:
                    log.info("metrics.write_recovered", path=str(path), failures=failures)
                failing, failures = None, 0
        await trio.sleep(interval)
