"""The ``vfio-irqd`` command: ``serve``, ``watch``, ``status``, ``top``, ``ping``, ``metrics``,
``sim fire``.

``serve`` runs the daemon; the other commands are small clients of its socket
built on :mod:`irqproto.blocking`. Exit codes: 0 success, 1 a runtime failure
(no daemon, an error answer, a lost connection), 2 bad usage (as argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, TypeVar

from irqd import __version__
from irqd.config import (
    DEFAULT_SOCKET_DIR,
    SOCKET_ENV,
    HotLoop,
    MsixStrategy,
    default_socket_path,
)
from irqd.configfile import ConfigFileError, FileSettings, default_config_path, load_settings
from irqd.logsetup import FORMATS, LEVELS, configure_logging
from irqd.settings import Flags, SettingsError, resolve
from irqd.tools.firing import fire
from irqd.tools.render import INDEXES, format_irq, format_ranges, render_status
from irqproto.blocking import Client
from irqproto.errors import Disconnected, RpcError
from irqproto.notifications import (
    DeviceLostNotification,
    IrqNotification,
    ResizedNotification,
    ShutdownNotification,
)

__all__ = ["CliError", "build_parser", "main", "normalize_bdf"]

PROG = "vfio-irqd"


#: Largest MSI-X table the PCI spec allows (Table Size is 11 bits, N-1 encoded).
MAX_MSIX_VECTORS = 2048
#: Largest MSI vector count (Multiple Message Capable tops out at 32).
MAX_MSI_VECTORS = 32


_BDF_RE = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


class CliError(Exception):
    """A failure to report on stderr as ``vfio-irqd: <message>`` with ``status``."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# -- argument types ------------------------------------------------------------------------


def normalize_bdf(text: str) -> str:
    """``0000:03:00.0`` from ``03:00.0`` or any case; ``ValueError`` if not a PCI address."""
    match = _BDF_RE.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a PCI address like 0000:03:00.0")
    domain, bus, slot, func = match.groups()
    return f"{(domain or '0000').lower()}:{bus.lower()}:{slot.lower()}.{func}"


def _bdf(text: str) -> str:
    try:
        return normalize_bdf(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range ({bound})")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _octal_mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 660") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range (000..777)")
    return value


def _vector(text: str) -> int:
    return _int_range(0, MAX_MSIX_VECTORS - 1)(text)


# -- the parser ----------------------------------------------------------------------------

_SOCKET_HELP = (
    f"the daemon's Unix socket (default: ${SOCKET_ENV} if set, else "
    f"{DEFAULT_SOCKET_DIR}/<instance>.sock, where the instance is the --device "
    "PCI address or 'sim')"
)


def _desc(text: str) -> str:
    # RawDescriptionHelpFormatter keeps the epilogs' example columns; the
    # descriptions are wrapped here instead.
    return textwrap.fill(text, width=78)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_socket(parser: argparse.ArgumentParser, *, with_device: bool) -> None:
    group = parser.add_argument_group("daemon")
    group.add_argument("--socket", metavar="PATH", type=Path, help=_SOCKET_HELP)
    if with_device:
        group.add_argument(
            "--device",
            metavar="BDF",
            type=_bdf,
            help="talk to the instance that owns this PCI device (picks the default socket)",
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``vfio-irqd`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_formatter,
        description=_desc(
            "Own a VFIO PCI device and forward its interrupts to client processes "
            "over msgpack-RPC on a Unix socket."
        ),
        epilog=(
            "examples:\n"
            "  vfio-irqd serve --sim                      run on the simulated device\n"
            "  vfio-irqd watch msix 0 1 2                 print interrupts as they arrive\n"
            "  vfio-irqd sim fire --count 10 0 1          raise 10 interrupts on vectors 0, 1\n"
            "  vfio-irqd status                           counts, clients, latency\n"
            "\n"
            "'vfio-irqd COMMAND --help' describes each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_serve(commands)
    _add_watch(commands)
    _add_status(commands)
    _add_top(commands)
    _add_ping(commands)
    _add_metrics(commands)

    sim = commands.add_parser(
        "sim",
        help="drive the simulated device",
        description=_desc("Commands that only work against a daemon running the simulated device."),
        formatter_class=_formatter,
        epilog="examples:\n  vfio-irqd sim fire --count 100 0 1",
    )
    sim_commands = sim.add_subparsers(dest="sim_command", metavar="SIMCOMMAND", required=True)
    _add_sim_fire(sim_commands)
    return parser


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        formatter_class=_formatter,
        description=_desc(
            "Run the daemon in the foreground until SIGINT or SIGTERM. Without --device it "
            "runs the simulated device, a model of the kernel's VFIO interrupt rules."
        ),
        epilog=(
            "examples:\n"
            "  vfio-irqd serve --sim --socket /tmp/irqd.sock\n"
            "  vfio-irqd serve --sim --sim-vectors 16 --sim-noresize --msix-strategy grow\n"
            "  vfio-irqd serve --device 0000:03:00.0 --log-format json\n"
            "  vfio-irqd serve --device 0000:03:00.0 --wait --config /etc/vfio-irqd/x.toml\n"
            "\n"
            "Logs go to stdout: readable on a terminal, JSON lines otherwise (journald).\n"
            "Signals: SIGTERM/SIGINT stop, SIGHUP reloads the config file, SIGUSR2 hands\n"
            "everything to the next process through systemd's fd store (exit 75)."
        ),
    )
    _add_socket(serve, with_device=False)
    _add_serve_device(serve)
    _add_serve_msix(serve)
    _add_serve_service(serve)
    serve.set_defaults(func=cmd_serve, parser=serve)


def _add_serve_device(serve: argparse.ArgumentParser) -> None:
    """``serve``'s device options: which device, and the simulated one's shape."""
    device = serve.add_argument_group("device")
    which = device.add_mutually_exclusive_group()
    which.add_argument(
        "--device", metavar="BDF", type=_bdf, help="PCI address of a real device bound to vfio-pci"
    )
    which.add_argument(
        "--sim", action="store_true", help="run the simulated device (the default without --device)"
    )
    device.add_argument(
        "--sim-vectors",
        metavar="N",
        type=_int_range(1, MAX_MSIX_VECTORS),
        help=f"MSI-X table size of the simulated device, 1..{MAX_MSIX_VECTORS} (default 64)",
    )
    device.add_argument(
        "--sim-noresize",
        action="store_true",
        default=None,
        help="report VFIO_IRQ_INFO_NORESIZE for MSI-X, like a kernel before 6.5",
    )
    device.add_argument(
        "--sim-msi-vectors",
        metavar="N",
        type=_int_range(1, MAX_MSI_VECTORS),
        help=f"MSI vectors of the simulated device, 1..{MAX_MSI_VECTORS} (default 1)",
    )


def _add_serve_msix(serve: argparse.ArgumentParser) -> None:
    """``serve``'s MSI-X options: the strategy and the pre-armed range."""
    msix = serve.add_argument_group("MSI-X")
    msix.add_argument(
        "--msix-strategy",
        choices=[s.value for s in MsixStrategy],
        help="how vectors are added to a running device (default auto: dynamic if the "
        "kernel allows it, else prearm)",
    )
    msix.add_argument(
        "--msix-prearm",
        metavar="N",
        type=_int_range(1, MAX_MSIX_VECTORS),
        help="vectors to enable up front with the prearm strategy (default: the table, up to 64)",
    )


def _add_serve_service(serve: argparse.ArgumentParser) -> None:
    """``serve``'s service options: hot loop, socket mode, logging, config file, wait."""
    svc = serve.add_argument_group("service")
    svc.add_argument(
        "--hot-loop",
        choices=[h.value for h in HotLoop],
        help="what forwards interrupts: native (a C thread, eventfd to socket without "
        "Python), python (a Trio task; the reference) or auto (default: native when built)",
    )
    svc.add_argument(
        "--socket-mode",
        metavar="OCTAL",
        type=_octal_mode,
        help="permission bits of the socket (default 660)",
    )
    svc.add_argument("--log-level", choices=list(LEVELS), help="default info")
    svc.add_argument(
        "--log-format",
        choices=list(FORMATS),
        help="auto (default): journal fields under systemd, console on a terminal, "
        "JSON lines otherwise",
    )
    svc.add_argument(
        "--config",
        metavar="PATH",
        type=Path,
        help="TOML settings (default: /etc/vfio-irqd/<instance>.toml if it exists); "
        "flags override it; SIGHUP reads it again",
    )
    svc.add_argument(
        "--wait",
        action="store_true",
        default=None,
        help="wait until --device is bound to vfio-pci, then open it",
    )
    svc.add_argument(
        "--metrics-file",
        metavar="PATH",
        type=Path,
        help="rewrite PATH (atomically) with Prometheus metrics, for node_exporter's "
        "textfile collector (docs/metrics.md); default: none",
    )
    svc.add_argument(
        "--metrics-interval",
        metavar="S",
        type=_positive_float,
        help="seconds between rewrites of --metrics-file (default 5)",
    )


def _add_watch(commands: Any) -> None:
    watch = commands.add_parser(
        "watch",
        help="subscribe to vectors and print interrupts as they arrive",
        formatter_class=_formatter,
        description=_desc(
            "Subscribe to VECTORs of INDEX and print one line per 'irq' notification: "
            "the interrupts since the previous line per vector, and the running total "
            "since watch started. 'resized', 'shutdown' and 'device_lost' are printed too. "
            "The first line says the subscription is in place."
        ),
        epilog=(
            "examples:\n"
            "  vfio-irqd watch msix 0 1 2\n"
            "  vfio-irqd watch --json --count 200 msix 0 1      exit after 200 interrupts\n"
            "  vfio-irqd watch --timeout 10 msi 0\n"
            "\n"
            "exit status: 0 on Ctrl-C, daemon shutdown, --count reached or --timeout without\n"
            "--count; 1 on errors, a lost device or connection, or --timeout before --count."
        ),
    )
    _add_socket(watch, with_device=True)
    watch.add_argument(
        "index", metavar="INDEX", choices=INDEXES, help="one of " + ", ".join(INDEXES)
    )
    watch.add_argument("vectors", metavar="VECTOR", nargs="+", type=_vector, help="vector numbers")
    watch.add_argument("--json", action="store_true", help="one JSON object per line")
    watch.add_argument(
        "--count",
        metavar="N",
        type=_int_range(1),
        help="exit after N interrupts in total have arrived",
    )
    watch.add_argument("--timeout", metavar="S", type=_positive_float, help="exit after S seconds")
    watch.set_defaults(func=cmd_watch, parser=watch)


def _add_status(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="show the device, per-vector counts, clients and latency",
        formatter_class=_formatter,
        description=_desc("Read 'device.info' and 'stats' and print them as tables, or as JSON."),
        epilog="examples:\n  vfio-irqd status\n  vfio-irqd status --json | jq .stats.vectors",
    )
    _add_socket(status, with_device=True)
    status.add_argument(
        "--json",
        action="store_true",
        help='print {"server", "protocol", "device", "stats"} as JSON (docs/cli.md)',
    )
    status.set_defaults(func=cmd_status, parser=status)


def _add_sim_fire(commands: Any) -> None:
    fire = commands.add_parser(
        "fire",
        help="raise interrupts on the simulated device",
        formatter_class=_formatter,
        description=_desc(
            "Fetch the eventfds of VECTORs from the daemon (sim.eventfds) and write them as "
            "the kernel does for each interrupt. A vector must have a subscriber (e.g. a "
            "running 'vfio-irqd watch') to have an eventfd."
        ),
        epilog=(
            "examples:\n"
            "  vfio-irqd sim fire 0                          one interrupt on msix vector 0\n"
            "  vfio-irqd sim fire --count 1000 0 1 2         1000 each, as fast as possible\n"
            "  vfio-irqd sim fire --rate 10 --count 0 0      10/s on vector 0 until Ctrl-C"
        ),
    )
    _add_socket(fire, with_device=True)
    fire.add_argument("--index", choices=INDEXES, default="msix", help="default msix")
    fire.add_argument(
        "--count",
        metavar="N",
        type=_int_range(0),
        default=1,
        help="interrupts per vector (default 1; 0 = until Ctrl-C)",
    )
    fire.add_argument(
        "--rate",
        metavar="R",
        type=_positive_float,
        help="interrupts per second per vector (default: as fast as possible)",
    )
    fire.add_argument("vectors", metavar="VECTOR", nargs="+", type=_vector, help="vector numbers")
    fire.set_defaults(func=cmd_sim_fire, parser=fire)


# -- helpers -------------------------------------------------------------------------------


def socket_path(args: argparse.Namespace) -> Path:
    """``--socket``, else the default for ``--device`` (or the ``sim`` instance)."""
    if args.socket is not None:
        return Path(args.socket)
    return default_socket_path(getattr(args, "device", None) or "sim")


@contextlib.contextmanager
def _connected(args: argparse.Namespace, name: str) -> Iterator[Client]:
    """A connected, greeted client; connection failures become :class:`CliError`."""
    path = socket_path(args)
    try:
        client = Client(str(path), client_name=f"{PROG} {name}")
    except (FileNotFoundError, ConnectionRefusedError):
        raise CliError(
            f"no daemon is listening on {path}; start one with "
            f"'{PROG} serve --sim --socket {path}' (or pass --socket)"
        ) from None
    except PermissionError:
        raise CliError(
            f"permission denied connecting to {path}; the socket's group must include you "
            "(see serve --socket-mode)"
        ) from None
    with client:
        yield client


_T = TypeVar("_T")


def _run_client(func: Callable[[], _T]) -> _T:
    """Run a client command, turning the protocol's failures into :class:`CliError`."""
    try:
        return func()
    except RpcError as exc:
        raise CliError(f"the daemon refused: {exc.code}: {exc.message}") from None
    except Disconnected:
        raise CliError("the daemon closed the connection") from None
    except TimeoutError:
        raise CliError("the daemon did not answer in time") from None
    except ConnectionError as exc:
        raise CliError(f"lost the connection to the daemon: {exc}") from None


class _ReaderGone(Exception):
    """Our stdout was closed by its reader (``vfio-irqd watch | head``).

    Not an ``OSError``: a ``BrokenPipeError`` from stdout must not be mistaken
    for the daemon's socket breaking.
    """


def _emit(out: TextIO, text: str) -> None:
    # Flushed per line: watch is read through pipes (scripts, the demo), and a
    # line stuck in a block buffer is an interrupt the reader never sees.
    try:
        out.write(text + "\n")
        out.flush()
    except BrokenPipeError:
        raise _ReaderGone from None


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# -- commands ------------------------------------------------------------------------------


def _file_settings(args: argparse.Namespace) -> FileSettings:
    """The config file's settings: ``--config``, else ``/etc/vfio-irqd/<instance>.toml``
    if it exists, else none. ``CliError`` (exit 2) naming file, key and reason."""
    try:
        if args.config is not None:
            return load_settings(Path(args.config))
        path = default_config_path(args.device or "sim")
        if path.exists():
            return load_settings(path)
    except ConfigFileError as exc:
        raise CliError(str(exc), status=2) from None
    return FileSettings()


def cmd_serve(args: argparse.Namespace) -> int:
    """``serve``: merge flags over the config file, validate, configure logging, run.

    A flag given on the command line wins over the file, the file over the
    built-in default (``irqd.settings.resolve``).
    """
    parser: argparse.ArgumentParser = args.parser
    file = _file_settings(args)
    flags = Flags(
        device=args.device,
        sim=bool(args.sim),
        wait=args.wait,
        socket_path=args.socket,
        socket_mode=args.socket_mode,
        msix_strategy=None if args.msix_strategy is None else MsixStrategy(args.msix_strategy),
        msix_prearm=args.msix_prearm,
        hot_loop=None if args.hot_loop is None else HotLoop(args.hot_loop),
        sim_vectors=args.sim_vectors,
        sim_noresize=args.sim_noresize,
        sim_msi_vectors=args.sim_msi_vectors,
        log_level=args.log_level,
        log_format=args.log_format,
        metrics_file=None if args.metrics_file is None else args.metrics_file.absolute(),
        metrics_interval=args.metrics_interval,
    )
    try:
        config = resolve(flags, file)
    except SettingsError as exc:
        parser.error(str(exc))
    configure_logging(config.log_level, config.log_format)
    # Imported here, not at the top: the server pulls in Trio and the device
    # backends, which the client commands and --help have no use for.
    from irqd.process.service import run  # noqa: PLC0415

    return run(config)


def cmd_watch(args: argparse.Namespace) -> int:
    """``watch``: subscribe and print notifications until told to stop."""
    out = sys.stdout
    vectors: list[int] = list(dict.fromkeys(args.vectors))
    deadline = time.monotonic() + args.timeout if args.timeout is not None else None

    def say(human: str, record: dict[str, Any]) -> None:
        if args.json:
            _emit(out, json.dumps({"time": _now_iso(), **record}, separators=(",", ":")))
        else:
            _emit(out, human)

    def run() -> int:
        with _connected(args, "watch") as client:
            result = client.subscribe(args.index, vectors)
            say(
                f"subscribed to {args.index} {format_ranges(result['vectors'])} "
                f"({result['how']}); Ctrl-C to stop",
                {"event": "subscribed", "index": args.index, **result},
            )
            totals: dict[int, int] = dict.fromkeys(vectors, 0)
            seen = 0
            while args.count is None or seen < args.count:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    note = client.next_notification(timeout=remaining)
                except TimeoutError:
                    break
                except (Disconnected, ConnectionError, EOFError):
                    raise CliError("the daemon closed the connection") from None
                counted, status = _show_notification(note, say, totals)
                seen += counted
                if status is not None:
                    return status
            if args.count is not None and seen < args.count:
                raise CliError(
                    f"timed out after {args.timeout:g} s with {seen} of {args.count} interrupts"
                )
            return 0

    # Ctrl-C is the normal way to stop watching; make sure it raises even if
    # the parent started us with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _run_client(run)
    except KeyboardInterrupt:
        return 0


def _show_notification(
    note: object, say: Callable[[str, dict[str, Any]], None], totals: dict[int, int]
) -> tuple[int, int | None]:
    """Print one notification for ``watch``; ``totals`` counts interrupts per vector.

    Returns the interrupts it carried and, for one that ends the watch
    (``shutdown``, ``device_lost``), the exit status.
    """
    if isinstance(note, IrqNotification):
        seen = 0
        for vector, count in note.counts:
            totals[vector] = totals.get(vector, 0) + count
            seen += count
        say(
            format_irq(note.index, note.counts, totals),
            {
                "event": "irq",
                "index": note.index,
                "vectors": [{"vector": v, "count": n, "total": totals[v]} for v, n in note.counts],
            },
        )
        return seen, None
    if isinstance(note, ResizedNotification):
        loss = "; interrupts may have been lost" if note.possible_loss else ""
        say(
            f"resized {note.index}: now {format_ranges(note.vectors)}{loss}",
            {
                "event": "resized",
                "index": note.index,
                "vectors": list(note.vectors),
                "possible_loss": note.possible_loss,
            },
        )
        return 0, None
    if isinstance(note, ShutdownNotification):
        say(f"shutdown: {note.reason}", {"event": "shutdown", "reason": note.reason})
        return 0, 0
    if isinstance(note, DeviceLostNotification):
        say(f"device_lost: {note.reason}", {"event": "device_lost", "reason": note.reason})
        return 0, 1
    # A notification newer than this client: show it, keep going.
    name = getattr(note, "method", type(note).__name__)
    params = list(getattr(note, "params", ()))
    say(f"{name} {params!r}", {"event": str(name), "params": params})
    return 0, None


def cmd_status(args: argparse.Namespace) -> int:
    """``status``: ``device.info`` and ``stats`` as tables or JSON."""

    def run() -> int:
        with _connected(args, "status") as client:
            info = client.device_info()
            stats = client.stats()
            hello: dict[str, Any] = dict(client.server_info or {})
        if args.json:
            # The shape is documented in docs/cli.md: the protocol's device.info
            # and stats results unchanged, so their keys are as stable as the
            # protocol's; only this command's own connection is left out of
            # the clients, as in the table, so `jq '.stats.clients | length'`
            # counts the daemon's real clients.
            own = f"{PROG} status"
            stats = {
                **stats,
                "clients": [
                    c
                    for c in stats.get("clients", [])
                    if not (c.get("pid") == os.getpid() and c.get("name") == own)
                ],
            }
            report = {
                "server": hello.get("server"),
                "protocol": hello.get("protocol"),
                "device": info,
                "stats": stats,
            }
            _emit(sys.stdout, json.dumps(report, indent=2, sort_keys=True))
        else:
            _emit(sys.stdout, render_status(dict(info), dict(stats)))
        return 0

    return _run_client(run)


def cmd_sim_fire(args: argparse.Namespace) -> int:
    """``sim fire``: write the vectors' eventfds ``--count`` times at ``--rate``."""
    vectors: list[int] = list(dict.fromkeys(args.vectors))

    def fetch() -> list[int]:
        with _connected(args, "sim-fire") as client:
            return client.sim_eventfds(args.index, vectors)

    fds: list[int] = []
    stop = False

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        # Stop between rounds instead of raising KeyboardInterrupt mid-write,
        # so the summary counts exactly what the daemon will see.
        nonlocal stop
        stop = True

    try:
        fds = _run_client(fetch)
    except KeyboardInterrupt:
        return 0
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = fire(
            list(zip(vectors, fds, strict=True)),
            count=args.count,
            rate=args.rate,
            should_stop=lambda: stop,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
        for fd in fds:
            os.close(fd)
    per_vector = ", ".join(f"v{v} {n}" for v, n in result.written)
    rate = f", {result.total / result.elapsed_s:,.0f}/s" if result.elapsed_s > 0 else ""
    _emit(
        sys.stdout,
        f"fired {args.index}: {per_vector} ({result.total} interrupts in "
        f"{result.elapsed_s:.3f} s{rate})",
    )
    return 0


# -- top and ping ----------------------------------------------------------------------------


def _add_top(commands: Any) -> None:
    top = commands.add_parser(
        "top",
        help="live view of interrupt rates, clients and their backlog",
        formatter_class=_formatter,
        description=_desc(
            "A full-screen view refreshed every --interval seconds: per-vector interrupt "
            "rates (the change of the 'stats' totals over the interval) and totals, the "
            "clients with their vectors, delivery rate and pending backlog, host vectors "
            "allocated and the MSI-X strategy. Plain terminfo, no colours or mouse, so it "
            "works over ssh. q or Ctrl-C quits. --once prints a single frame as plain text "
            "instead, with rates measured over one interval."
        ),
        epilog=(
            "examples:\n"
            "  vfio-irqd top\n"
            "  vfio-irqd top --interval 0.5 --device 0000:03:00.0\n"
            "  vfio-irqd top --once --interval 2 > snapshot.txt"
        ),
    )
    _add_socket(top, with_device=True)
    top.add_argument(
        "--interval",
        metavar="S",
        type=_positive_float,
        default=1.0,
        help="seconds between refreshes, and the span rates are measured over (default 1)",
    )
    top.add_argument(
        "--once",
        action="store_true",
        help="print one frame as plain text and exit (no terminal needed)",
    )
    top.set_defaults(func=cmd_top, parser=top)


def _add_ping(commands: Any) -> None:
    ping = commands.add_parser(
        "ping",
        help="loopback-trigger vectors and time the round trip",
        formatter_class=_formatter,
        description=_desc(
            "Subscribe to VECTORs, then have the kernel raise each of them with a loopback "
            "'trigger', one at a time, and time how long until the 'irq' notification "
            "comes back: the whole path from request to device, eventfd, dispatcher and "
            "socket. Reports min/median/max per vector over --count rounds. Subscribing "
            "enables a vector that nobody used yet, as any client's subscribe would."
        ),
        epilog=(
            "examples:\n"
            "  vfio-irqd ping 0 1 2\n"
            "  vfio-irqd ping --count 20 --json 0 | jq .vectors[0].rtt_us\n"
            "  vfio-irqd ping --index msi 0\n"
            "\n"
            "exit status: 0 if every trigger came back within --timeout, 1 otherwise\n"
            "(or on an error from the daemon), 2 on bad usage."
        ),
    )
    _add_socket(ping, with_device=True)
    ping.add_argument("--index", choices=INDEXES, default="msix", help="default msix")
    ping.add_argument(
        "--count",
        metavar="N",
        type=_int_range(1, 100_000),
        default=5,
        help="triggers per vector (default 5)",
    )
    ping.add_argument(
        "--timeout",
        metavar="S",
        type=_positive_float,
        default=1.0,
        help="seconds to wait for each trigger to come back (default 1)",
    )
    ping.add_argument("--json", action="store_true", help="print one JSON object")
    ping.add_argument("vectors", metavar="VECTOR", nargs="+", type=_vector, help="vector numbers")
    ping.set_defaults(func=cmd_ping, parser=ping)


def cmd_top(args: argparse.Namespace) -> int:
    """``top``: the live view, or one plain-text frame with ``--once``."""
    # Imported here: curses is of no use to the other commands.
    import curses  # noqa: PLC0415

    from irqd.tools.top import Sample, build_frame, run_live  # noqa: PLC0415

    if not args.once and not (sys.stdin.isatty() and sys.stdout.isatty()):
        args.parser.error("the live view needs a terminal; use --once for a plain-text frame")

    def run() -> int:
        with _connected(args, "top") as client:

            def fetch() -> Sample:
                return Sample(time.monotonic(), dict(client.device_info()), dict(client.stats()))

            if args.once:
                # Two readings one interval apart: a frame without rates would
                # leave out what top is for.
                first = fetch()
                time.sleep(args.interval)
                frame = build_frame(fetch(), first, own_pid=os.getpid())
                _emit(sys.stdout, frame.text())
                return 0
            try:
                run_live(fetch, interval=args.interval, own_pid=os.getpid())
            except curses.error as exc:
                raise CliError(
                    f"cannot drive this terminal ({exc}); check $TERM, or use --once"
                ) from None
            return 0

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _run_client(run)
    except KeyboardInterrupt:
        return 0


def cmd_ping(args: argparse.Namespace) -> int:
    """``ping``: subscribe, loopback-trigger each vector ``--count`` times, report the times."""
    from irqd.tools.ping import format_ping, ping, ping_json  # noqa: PLC0415

    vectors: list[int] = list(dict.fromkeys(args.vectors))

    def run() -> int:
        with _connected(args, "ping") as client:
            client.subscribe(args.index, vectors)
            results = ping(client, args.index, vectors, count=args.count, timeout=args.timeout)
        if args.json:
            _emit(sys.stdout, json.dumps(ping_json(args.index, results, args.timeout)))
        else:
            for line in format_ping(args.index, results, args.timeout):
                _emit(sys.stdout, line)
        return 0 if all(r.ok for r in results) else 1

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _run_client(run)
    except KeyboardInterrupt:
        return 1  # not every trigger was sent, so not a pass


# -- metrics ----------------------------------------------------------------------------------


def _add_metrics(commands: Any) -> None:
    metrics = commands.add_parser(
        "metrics",
        help="print the daemon's metrics in the Prometheus text format",
        formatter_class=_formatter,
        description=_desc(
            "Read 'device.info' and 'stats' and print them in the Prometheus text "
            "exposition format: the same metrics serve --metrics-file writes "
            "(docs/metrics.md). This command's own connection is not counted."
        ),
        epilog=(
            "examples:\n"
            "  vfio-irqd metrics\n"
            "  vfio-irqd metrics --device 0000:03:00.0 | grep interrupts_total"
        ),
    )
    _add_socket(metrics, with_device=True)
    metrics.set_defaults(func=cmd_metrics, parser=metrics)


def cmd_metrics(args: argparse.Namespace) -> int:
    """``metrics``: the Prometheus exposition of ``stats``, as ``--metrics-file`` has it."""
    # Imported here: the other commands have no use for prometheus_client.
    from irqd.metrics import exposition  # noqa: PLC0415

    own = f"{PROG} metrics"

    def run() -> bytes:
        with _connected(args, "metrics") as client:
            device = client.device_info()["device"]
            stats: dict[str, Any] = dict(client.stats())
        # As status --json does: this command's connection is no client of the daemon's.
        stats["clients"] = [
            c
            for c in stats.get("clients", [])
            if not (c.get("pid") == os.getpid() and c.get("name") == own)
        ]
        return exposition(stats, device)

    _emit(sys.stdout, _run_client(run).decode().rstrip("\n"))
    return 0


# -- entry point ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return exc.status
    except _ReaderGone:
        # `vfio-irqd watch | head`: the reader left, which is how such a
        # pipeline ends, not an error. Point stdout at /dev/null so the
        # interpreter's final flush does not complain about the pipe again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
