"""Logging for the daemon: structlog, journal fields under systemd, JSON lines, a console.

Follows structlog's production recommendations: loggers cached on first use,
ISO-8601 UTC timestamps, and a plain ``WriteLogger`` that writes one line per
event and flushes it, so journald (or a pipe, as in the demo) sees each event
as it happens.

Under systemd (``$JOURNAL_STREAM`` names our stdout) each event goes to
journald natively, its keys as journal fields and the JSON line as its
message (irqd.journal).

Records that third-party libraries send to the standard library's ``logging``
go through the same renderer, so stdout stays one format.

Events below the level are dropped before any processor runs, as structlog's
filtering bound logger does; the level is looked up on each call rather than
fixed when a logger is made, because SIGHUP may change it (``set_log_level``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
import structlog.tracebacks
from structlog.typing import EventDict, Processor

from irqd.journal import JOURNAL_SOCKET, JournalLoggerFactory, journal_fields, stream_is_journal

__all__ = ["FORMATS", "LEVELS", "configure_logging", "current_level", "set_log_level"]

#: Accepted ``--log-level`` values, mapped to the standard library's numbers.
LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: Accepted ``--log-format`` values; ``auto`` is ``journal`` when stdout is the
#: journal stream systemd gave us, ``console`` on a terminal, else ``json``.
FORMATS = ("auto", "json", "console", "journal")


class _Level:
    """The level in force; SIGHUP may change it while the daemon runs."""

    def __init__(self) -> None:
        self.level = logging.INFO
        self.name = "info"


_gate = _Level()


class _Journal:
    """The journald connection in use, closed when logging is configured again."""

    factory: JournalLoggerFactory | None = None


_journal = _Journal()

_Filtering: Any = structlog.make_filtering_bound_logger(logging.DEBUG)


def _gated(method: str, level: int) -> Any:
    base = getattr(_Filtering, method)

    def call(self: Any, *args: Any, **kw: Any) -> Any:
        # Before any processor runs, as in structlog's own filtering logger.
        if level < _gate.level:
            return None
        return base(self, *args, **kw)

    call.__name__ = method
    return call


def _gated_log(self: Any, level: int, *args: Any, **kw: Any) -> Any:
    if level < _gate.level:
        return None
    return _Filtering.log(self, level, *args, **kw)


#: structlog's filtering bound logger asks a level fixed when it is made, and a
#: cached logger keeps it; this one asks ``_gate`` on each call instead, so a
#: reload can change the level of loggers already in use. A dropped call still
#: costs only a method call and a comparison.
_GatedBoundLogger: Any = type(
    "GatedBoundLogger",
    (_Filtering,),
    {
        "log": _gated_log,
    }
    | {
        method: _gated(method, level)
        for method, level in (
            ("debug", logging.DEBUG),
            ("info", logging.INFO),
            ("msg", logging.INFO),
            ("warning", logging.WARNING),
            ("warn", logging.WARNING),
            ("error", logging.ERROR),
            ("exception", logging.ERROR),
            ("critical", logging.CRITICAL),
            ("fatal", logging.CRITICAL),
        )
    },
)


def current_level() -> str:
    """The level in force (a key of :data:`LEVELS`)."""
    return _gate.name


def set_log_level(level: str) -> None:
    """Change the level of every logger now; ``ValueError`` for an unknown level."""
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; choose from {', '.join(LEVELS)}") from None
    _gate.level = numeric
    _gate.name = level.lower()
    logging.getLogger().setLevel(numeric)


def _format(fmt: str, stream: TextIO) -> str:
    """``fmt`` with ``auto`` resolved for ``stream``."""
    if fmt != "auto":
        return fmt
    if stream_is_journal(stream):
        return "journal"
    isatty = getattr(stream, "isatty", None)
    return "console" if callable(isatty) and isatty() else "json"


class JournalRenderer:
    """Last processor for journald: the JSON line plus the event's keys as fields."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer(sort_keys=False)

    def __call__(
        self, logger: Any, name: str, event_dict: EventDict
    ) -> tuple[tuple[str], dict[str, Any]]:
        fields = journal_fields(event_dict)
        level = str(event_dict.get("level", name))
        line = self._json(logger, name, event_dict)
        return (str(line),), {"fields": fields, "level": level}


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    *,
    journal_socket: str = JOURNAL_SOCKET,
) -> None:
    """Configure structlog (and the standard library's root logger) for the process.

    ``level`` is one of :data:`LEVELS`; ``fmt`` one of :data:`FORMATS`. Output
    goes to ``stream``, by default ``sys.stdout`` as looked up now (journald
    collects a service's stdout; ``journal`` sends to ``journal_socket``).
    Raises ``ValueError`` for an unknown level or format. Call it once,
    before the first log call: with
    ``cache_logger_on_first_use`` a logger that has already logged keeps the
    configuration it first saw.
    """
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; choose from {', '.join(LEVELS)}") from None
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; choose from {', '.join(FORMATS)}")
    out = stream if stream is not None else sys.stdout
    resolved = _format(fmt, out)

    _gate.level = numeric
    _gate.name = level.lower()
    shared, renderer = _processors(resolved != "console", out)
    factory: Any = structlog.WriteLoggerFactory(file=out)
    final: Processor = renderer
    if _journal.factory is not None:
        _journal.factory.close()
        _journal.factory = None
    if resolved == "journal":
        _journal.factory = JournalLoggerFactory(out, journal_socket)
        factory, final = _journal.factory, JournalRenderer()
    structlog.configure(
        processors=[*shared, final],
        wrapper_class=_GatedBoundLogger,
        context_class=dict,
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # The standard library's records (third-party libraries, rare) stay JSON
    # lines on the stream, which journald stores as messages.
    _route_stdlib(out, shared, renderer, numeric)


def _processors(as_json: bool, out: TextIO) -> tuple[list[Processor], Processor]:
    """The processors every event goes through, and the renderer that ends the chain."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if as_json:
        # Tracebacks as structured data: one JSON object per event, never a
        # multi-line blob that journald would split into separate entries.
        # Without locals: they can hold client data and make one line huge.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        shared.append(structlog.dev.set_exc_info)
        renderer = structlog.dev.ConsoleRenderer(colors=_colors(out))
    return shared, renderer


def _route_stdlib(out: TextIO, shared: list[Processor], renderer: Processor, numeric: int) -> None:
    """Send the standard library's logging (the root logger) through the same chain."""
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)


def _colors(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty())
