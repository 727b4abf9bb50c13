"""Logging for the daemon: structlog, JSON lines for journald, a readable console on a terminal.

Follows structlog's production recommendations: loggers cached on first use,
ISO-8601 UTC timestamps, and a plain ``WriteLogger`` that writes one line per
event and flushes it, so journald (or a pipe, as in the demo) sees each event
as it happens.

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
from structlog.typing import Processor

__all__ = ["FORMATS", "LEVELS", "configure_logging", "current_level", "set_log_level"]

#: Accepted ``--log-level`` values, mapped to the standard library's numbers.
LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: Accepted ``--log-format`` values; ``auto`` is ``console`` on a terminal, else ``json``.
FORMATS = ("auto", "json", "console")


class _Level:
    """The level in force; SIGHUP may change it while the daemon runs."""

    def __init__(self) -> None:
        self.level = logging.INFO
        self.name = "info"


_gate = _Level()

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


def _want_json(fmt: str, stream: TextIO) -> bool:
    if fmt == "json":
        return True
    if fmt == "console":
        return False
    # Under systemd stdout is a socket to journald, never a terminal.
    isatty = getattr(stream, "isatty", None)
    return not (callable(isatty) and isatty())


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog (and the standard library's root logger) for the process.

    ``level`` is one of :data:`LEVELS`; ``fmt`` one of :data:`FORMATS`. Output
    goes to ``stream``, by default ``sys.stdout`` as looked up now (journald
    collects a service's stdout). Raises ``ValueError`` for an unknown level or
    format. Call it once, before the first log call: with
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
    as_json = _want_json(fmt, out)

    _gate.level = numeric
    _gate.name = level.lower()
    shared, renderer = _processors(as_json, out)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=_GatedBoundLogger,
        context_class=dict,
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
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
