"""``vfio-irqd top``: a live view of the daemon, refreshed every interval.

Two layers, so that everything worth testing runs without a terminal:

- :func:`build_frame` turns two readings of the daemon (:class:`Sample`: the
  ``device.info`` and ``stats`` results and when they were taken) into the lines
  of one screen. Rates are deltas of the ``stats`` totals over the time between
  the readings. It is pure: the tests feed it canned results.
- :func:`run_live` is the curses loop around it: read, draw, wait for a key or
  the next refresh. It uses nothing but plain terminfo capabilities (no colour,
  no mouse), so it works over ssh and inside tmux or screen.

``--once`` skips curses altogether and prints one frame as plain text.
"""

from __future__ import annotations

import contextlib
import curses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from irqd.stats import bucket_percentile
from irqd.tools.render import INDEXES, client_dma, format_dma, format_ranges

__all__ = [
    "Frame",
    "Sample",
    "build_frame",
    "client_rates",
    "format_uptime",
    "run_live",
    "vector_rates",
]

#: Keys that leave the live view (Ctrl-C works too, as SIGINT).
QUIT_KEYS = frozenset({ord("q"), ord("Q")})

#: Fewest vector rows shown when the terminal is short; the clients get the rest.
MIN_VECTOR_ROWS = 3


@dataclass(frozen=True)
class Sample:
    """One reading of the daemon."""

    #: ``time.monotonic()`` when the reading was taken.
    at: float
    #: The ``device.info`` result.
    info: dict[str, Any]
    #: The ``stats`` result.
    stats: dict[str, Any]


@dataclass(frozen=True)
class Frame:
    """One screen: its lines, and which of them are headings (drawn bold in curses)."""

    lines: list[str]
    headings: frozenset[int] = field(default_factory=frozenset)

    def text(self) -> str:
        """The frame as plain text, one line per line, without trailing spaces."""
        return "\n".join(line.rstrip() for line in self.lines)


def _index_order(name: str) -> int:
    return INDEXES.index(name) if name in INDEXES else len(INDEXES)


def _elapsed(previous: Sample | None, current: Sample) -> float | None:
    if previous is None:
        return None
    elapsed = current.at - previous.at
    return elapsed if elapsed > 0 else None


def _rate(now: int, before: int | None, elapsed: float) -> float:
    # A total lower than before means the vector was released and enabled
    # again (its count restarts at enable) or the daemon restarted: everything
    # counted now happened within the interval.
    if before is None or now < before:
        return now / elapsed
    return (now - before) / elapsed


def vector_rates(previous: Sample | None, current: Sample) -> dict[tuple[str, int], float]:
    """Interrupts per second per ``(index, vector)`` between two samples.

    Empty without a previous sample (nothing to compare with yet). A vector
    that appeared since the previous sample counts from zero.
    """
    elapsed = _elapsed(previous, current)
    if previous is None or elapsed is None:
        return {}
    before = {(v["index"], v["vector"]): int(v["count"]) for v in previous.stats.get("vectors", [])}
    return {
        (v["index"], v["vector"]): _rate(
            int(v["count"]), before.get((v["index"], v["vector"])), elapsed
        )
        for v in current.stats.get("vectors", [])
    }


def client_rates(previous: Sample | None, current: Sample) -> dict[int, float]:
    """Interrupts delivered per second per client id between two samples."""
    elapsed = _elapsed(previous, current)
    if previous is None or elapsed is None:
        return {}
    before = {c["id"]: int(c.get("delivered", 0)) for c in previous.stats.get("clients", [])}
    return {
        c["id"]: _rate(int(c.get("delivered", 0)), before.get(c["id"]), elapsed)
        for c in current.stats.get("clients", [])
    }


def format_uptime(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``, ``4d03h``: short enough for a header."""
    total = int(seconds)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _fmt_rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:.1f}" if rate < 1e6 else f"{rate:.3g}"


def _columns(
    headers: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool]
) -> list[str]:
    cells = [list(r) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)
        ).rstrip()

    return [line(headers), *(line(r) for r in cells)]


def _subscriptions(pairs: Iterable[Sequence[Any]]) -> str:
    by_index: dict[str, list[int]] = {}
    for index, number in pairs:
        by_index.setdefault(str(index), []).append(int(number))
    ordered = sorted(by_index.items(), key=lambda item: _index_order(item[0]))
    return " ".join(f"{index} {format_ranges(numbers)}" for index, numbers in ordered) or "-"


def _header(
    current: Sample,
    previous: Sample | None,
    clients: Sequence[dict[str, Any]],
    rates: dict[tuple[str, int], float],
    *,
    width: int | None,
    hint: str | None,
) -> list[str]:
    """The three lines on top: device and uptime, MSI-X, overall traffic."""
    info, stats = current.info, current.stats
    uptime = stats.get("uptime_s")
    up = f"   up {format_uptime(float(uptime))}" if isinstance(uptime, (int, float)) else ""
    title = f"vfio-irqd top   {info.get('device', '?')} ({info.get('backend', '?')}){up}"
    # The hint goes at the right edge, and only where it fits whole.
    if hint and (width is None or len(title) + 2 + len(hint) <= width):
        pad = max(2, (width or 0) - len(title) - len(hint))
        title = f"{title}{' ' * pad}{hint}"

    msix_info = info.get("msix")
    msix: dict[str, Any] = msix_info if isinstance(msix_info, dict) else {}
    strategy = stats.get("msix_strategy") or info.get("msix_strategy") or "?"
    kind = "dynamic" if msix.get("dynamic") else ("noresize" if msix.get("noresize") else "-")
    host = stats.get("host_vectors") or {}
    host_text = ", ".join(
        f"{k} {v}" for k, v in sorted(host.items(), key=lambda kv: _index_order(kv[0]))
    )
    strategy_line = (
        f"msix strategy {strategy}   table {msix.get('count', '?')} ({kind})   "
        f"host vectors allocated: {host_text or 'none'}"
    )
    dma = stats.get("dma")
    if isinstance(dma, dict):
        strategy_line += f"   dma {format_dma(dma)}"

    total = sum(int(v["count"]) for v in stats.get("vectors", []))
    overall = _fmt_rate(sum(rates.values())) if previous is not None else "-"
    pending = sum(int(c.get("pending", 0)) for c in clients)
    latency = stats.get("latency_us", {})
    bounds, counts = latency.get("bounds", []), latency.get("counts", [])
    if sum(counts):
        p50 = bucket_percentile(bounds, counts, 0.5)
        p99 = bucket_percentile(bounds, counts, 0.99)
        lat = f"latency p50<={p50}us p99<={p99}us"
    else:
        lat = "latency -"
    traffic = f"interrupts {overall}/s   total {total}   pending {pending}   {lat}"
    return [title, strategy_line, traffic]


def _vector_table(
    vectors: Sequence[dict[str, Any]], rates: dict[tuple[str, int], float]
) -> list[str]:
    if not vectors:
        return ["  (no vectors enabled)"]
    rows = [
        [
            v["index"],
            str(v["vector"]),
            _fmt_rate(rates.get((v["index"], v["vector"]))),
            str(v["count"]),
            str(v.get("subscribers", 0)),
        ]
        for v in vectors
    ]
    return _columns(
        ["INDEX", "VECTOR", "RATE/s", "TOTAL", "SUBS"], rows, [False, True, True, True, True]
    )


def _client_table(clients: Sequence[dict[str, Any]], delivery: dict[int, float]) -> list[str]:
    if not clients:
        return ["  (no clients)"]
    rows = [
        [
            str(c.get("id", "?")),
            str(c.get("name") or "?"),
            str(c.get("pid", "?")),
            str(c.get("uid", "?")),
            str(c.get("pending", 0)),
            str(c.get("delivered", 0)),
            _fmt_rate(delivery.get(c["id"])) if "id" in c else "-",
            _subscriptions(c.get("vectors", [])) + client_dma(c),
        ]
        for c in clients
    ]
    return _columns(
        ["ID", "NAME", "PID", "UID", "PENDING", "DELIVERED", "RATE/s", "VECTORS"],
        rows,
        [True, False, True, True, True, True, True, False],
    )


def build_frame(
    current: Sample,
    previous: Sample | None = None,
    *,
    own_pid: int | None = None,
    width: int | None = None,
    height: int | None = None,
    hint: str | None = None,
) -> Frame:
    """The lines of one ``top`` screen for ``current``, with rates since ``previous``.

    Without ``previous`` rates show as ``-``. ``own_pid`` leaves out the client
    connection that reads the stats (top's own). ``width`` cuts every line;
    ``height`` limits the frame to that many lines by showing fewer vector (then
    client) rows and saying how many were left out. ``hint`` is shown at the
    right of the first line.
    """
    stats = current.stats
    rates = vector_rates(previous, current)
    vectors = sorted(
        stats.get("vectors", []), key=lambda v: (_index_order(v["index"]), v["vector"])
    )
    clients = [c for c in stats.get("clients", []) if own_pid is None or c.get("pid") != own_pid]
    lines = _header(current, previous, clients, rates, width=width, hint=hint)
    lines.append("")
    headings = {0}

    vector_table = _vector_table(vectors, rates)
    client_table = _client_table(clients, client_rates(previous, current))
    if height is not None:
        # What is left after the header, the two titles and the blank between:
        # the clients keep their rows while the vectors keep a few.
        room = max(0, height - len(lines) - 3)
        client_room = max(0, min(len(client_table), room - MIN_VECTOR_ROWS - 1))
        client_table = _fit(client_table, client_room, "clients")
        vector_table = _fit(vector_table, max(0, room - len(client_table)), "vectors")

    def section(title: str, table: list[str], has_rows: bool) -> None:
        headings.add(len(lines))
        lines.append(title)
        if has_rows and table:
            headings.add(len(lines))  # the column headers
        lines.extend(table)

    section(f"VECTORS {len(vectors)}", vector_table, bool(vectors))
    lines.append("")
    section(f"CLIENTS {len(clients)}", client_table, bool(clients))

    if height is not None:
        lines = lines[:height]
    if width is not None:
        lines = [line[:width] for line in lines]
    return Frame(lines, frozenset(i for i in headings if i < len(lines)))


def _fit(table: list[str], room: int, what: str) -> list[str]:
    """``table`` cut to ``room`` lines, the last saying how many rows were left out."""
    if len(table) <= room:
        return table
    if room <= 1:
        return table[:room]
    hidden = len(table) - (room - 1)
    return [*table[: room - 1], f"  ... {hidden} more {what} (vfio-irqd top --once lists all)"]


# -- the live view ---------------------------------------------------------------------------


def run_live(fetch: Callable[[], Sample], *, interval: float, own_pid: int | None) -> None:
    """Show frames in the terminal until q (or Ctrl-C, raised as ``KeyboardInterrupt``).

    ``fetch`` reads the daemon; its exceptions end the view and propagate once
    the terminal has been restored. ``curses.error`` is raised when the
    terminal cannot be driven (an unknown ``$TERM``).
    """
    curses.wrapper(_loop, fetch, interval, own_pid)


def _loop(
    screen: curses.window, fetch: Callable[[], Sample], interval: float, own_pid: int | None
) -> None:
    # Invisible cursor where the terminal can; a plain terminal that cannot is
    # still fine to draw on.
    with contextlib.suppress(curses.error):
        curses.curs_set(0)
    hint = f"every {interval:g}s, q quits"
    previous: Sample | None = None
    current = fetch()
    due = time.monotonic() + interval
    while True:
        _draw(screen, current, previous, own_pid, hint)
        # Wait for a key until the next refresh is due; a resize redraws at once.
        while (remaining := due - time.monotonic()) > 0:
            screen.timeout(max(1, int(remaining * 1000)))
            key = screen.getch()
            if key in QUIT_KEYS:
                return
            if key == curses.KEY_RESIZE:
                _draw(screen, current, previous, own_pid, hint)
        previous, current = current, fetch()
        # Keep the cadence, but never try to catch up after a stall.
        due = max(due + interval, time.monotonic())


def _draw(
    screen: curses.window, current: Sample, previous: Sample | None, own_pid: int | None, hint: str
) -> None:
    height, width = screen.getmaxyx()
    # One column short: writing the bottom-right cell makes curses scroll or fail.
    frame = build_frame(
        current, previous, own_pid=own_pid, width=max(1, width - 1), height=height, hint=hint
    )
    screen.erase()
    for row, line in enumerate(frame.lines):
        attr = curses.A_BOLD if row in frame.headings else curses.A_NORMAL
        # A terminal resized smaller between getmaxyx and here refuses writes
        # off-screen; the next frame fits again.
        with contextlib.suppress(curses.error):
            screen.addnstr(row, 0, line, max(1, width - 1), attr)
    screen.refresh()
