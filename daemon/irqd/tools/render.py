"""Human-readable text for the CLI: the ``status`` report and ``watch`` lines.

Pure functions over protocol results, so they are tested without a daemon.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from irqd.stats import bucket_percentile

#: IRQ index names as the protocol spells them (VFIO_PCI_*_IRQ_INDEX order).
INDEXES = ("intx", "msi", "msix", "err", "req")

#: vfio_irq_info.flags bits (include/uapi/linux/vfio.h), for ``status``.
_IRQ_FLAG_NAMES = (
    (1 << 0, "eventfd"),
    (1 << 1, "maskable"),
    (1 << 2, "automasked"),
    (1 << 3, "noresize"),
)


def format_ranges(numbers: Iterable[int]) -> str:
    """``0-3,7`` for ``[0, 1, 2, 3, 7]``; ``-`` for none."""
    ordered = sorted(set(numbers))
    if not ordered:
        return "-"
    parts: list[str] = []
    start = prev = ordered[0]
    for n in [*ordered[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(parts)


def format_bytes(size: int) -> str:
    """A byte count as people read it: ``0``, ``4 KiB``, ``1.5 MiB``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} B" if size else "0"


def format_dma(dma: dict[str, Any]) -> str:
    """``stats.dma``: the bytes mapped for DMA and in how many buffers."""
    mappings = int(dma.get("mappings", 0))
    plural = "" if mappings == 1 else "s"
    return f"{format_bytes(int(dma.get('bytes', 0)))} mapped in {mappings} buffer{plural}"


def client_dma(client: dict[str, Any]) -> str:
    """``   dma 8 KiB`` for a client that holds DMA memory, else nothing."""
    held = client.get("dma_bytes")
    return f"   dma {format_bytes(int(held))}" if held else ""


def _dma_lines(stats: dict[str, Any]) -> list[str]:
    dma = stats.get("dma")
    return [f"dma       {format_dma(dma)}"] if isinstance(dma, dict) else []


def format_irq(index: str, counts: Sequence[tuple[int, int]], totals: dict[int, int]) -> str:
    """``msix  v0 +3 (total 12)  v2 +1 (total 4)``; ``totals`` already includes ``counts``."""
    cells = [f"v{vector} +{count} (total {totals.get(vector, count)})" for vector, count in counts]
    return "  ".join([f"{index:<4}", *cells])


def _flag_names(flags: int) -> str:
    names = [name for bit, name in _IRQ_FLAG_NAMES if flags & bit]
    return ",".join(names) or "-"


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  "
) -> list[str]:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    # Numbers right-aligned (and their headers with them) so magnitudes line up.
    numeric = [bool(rows) and all(isinstance(r[i], int) for r in rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        )
        return (indent + "  ".join(padded)).rstrip()

    return [line(headers), *(line(r) for r in cells)]


def render_status(info: dict[str, Any], stats: dict[str, Any]) -> str:
    """The human ``status`` report for a ``device.info`` and a ``stats`` result."""
    lines = [
        *_header_lines(info, stats),
        *_index_lines(info),
        *_vector_lines(stats),
        *_client_lines(stats),
        *_dispatch_lines(stats),
    ]
    return "\n".join(lines)


def _header_lines(info: dict[str, Any], stats: dict[str, Any]) -> list[str]:
    """The device, its uptime, the MSI-X strategy, host vectors and DMA figures."""
    lines: list[str] = []
    uptime = stats.get("uptime_s")
    up = f"   up {uptime:.1f} s" if isinstance(uptime, (int, float)) else ""
    lines.append(f"device    {info.get('device', '?')}   backend {info.get('backend', '?')}{up}")
    strategy = info.get("msix_strategy", stats.get("msix_strategy", "?"))
    host = stats.get("host_vectors") or {}
    host_text = ", ".join(f"{k} {v}" for k, v in sorted(host.items())) or "-"
    lines += [f"msix      strategy {strategy}   host vectors: {host_text}", *_dma_lines(stats)]
    lines.append("")
    return lines


def _index_lines(info: dict[str, Any]) -> list[str]:
    """The interrupt indexes table."""
    lines: list[str] = []
    rows = []
    for index in INDEXES:
        entry = info.get(index)
        if not isinstance(entry, dict):
            continue
        mode = "dynamic" if entry.get("dynamic") else ("noresize" if entry.get("noresize") else "-")
        rows.append(
            [
                index,
                entry.get("count", 0),
                _flag_names(int(entry.get("flags", 0))),
                mode,
                "yes" if entry.get("active") else "no",
                format_ranges(entry.get("enabled", [])),
            ]
        )
    lines.append("interrupt indexes")
    lines += _table(["index", "count", "flags", "resize", "active", "enabled"], rows)
    lines.append("")
    return lines


def _vector_lines(stats: dict[str, Any]) -> list[str]:
    """The enabled vectors table."""
    lines: list[str] = []
    vectors = stats.get("vectors", [])
    lines.append("vectors")
    if vectors:
        lines += _table(
            ["index", "vector", "total", "subscribers"],
            [[v["index"], v["vector"], v["count"], v["subscribers"]] for v in vectors],
        )
    else:
        lines.append("  (none enabled)")
    lines.append("")
    return lines


def _client_lines(stats: dict[str, Any]) -> list[str]:
    """The clients table (without the connection reading the stats)."""
    lines: list[str] = []
    # Leave out the connection this very command is reading stats over.
    clients = [c for c in stats.get("clients", []) if c.get("pid") != os.getpid()]
    lines.append("clients")
    if clients:
        rows = []
        for c in clients:
            by_index: dict[str, list[int]] = {}
            for index, number in c.get("vectors", []):
                by_index.setdefault(index, []).append(number)
            subs = (
                " ".join(f"{i} {format_ranges(ns)}" for i, ns in by_index.items()) or "-"
            ) + client_dma(c)
            rows.append(
                [
                    c.get("id", "?"),
                    c.get("name") or "?",
                    c.get("pid", "?"),
                    c.get("uid", "?"),
                    c.get("pending", 0),
                    c.get("delivered", "-"),
                    subs,
                ]
            )
        lines += _table(["id", "name", "pid", "uid", "pending", "delivered", "vectors"], rows)
    else:
        lines.append("  (none)")
    lines.append("")
    return lines


def _dispatch_lines(stats: dict[str, Any]) -> list[str]:
    """The hot loop, the dispatcher and the delivery latency."""
    lines: list[str] = []
    dispatch = stats.get("dispatch", {})
    hot_loop = dispatch.get("hot_loop", "python")
    lines.append(
        f"hot loop  {hot_loop}"
        + (f"   rounds {dispatch.get('hot_rounds', 0)}" if hot_loop == "native" else "")
    )
    lines.append(
        f"dispatch  rounds {dispatch.get('rounds', 0)}   events {dispatch.get('events', 0)}   "
        f"native {'yes' if dispatch.get('native') else 'no'}"
    )
    latency = stats.get("latency_us", {})
    bounds, counts = latency.get("bounds", []), latency.get("counts", [])
    total = sum(counts)
    if total:
        marks = [
            f"{label} <= {bucket_percentile(bounds, counts, q)} us"
            for label, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))
        ]
        lines.append(f"latency   deliveries {total}   " + "   ".join(marks))
    else:
        lines.append("latency   no deliveries yet")
    return lines
