"""The one precedence rule for settings: a flag beats the config file, the file beats the default.

``serve`` builds its :class:`~irqd.config.ServerConfig` with :func:`resolve`
(command-line flags, the config file, the built-in defaults); SIGHUP reads
the file again and applies :func:`reload_plan` to the running config, where
a setting given on the command line (``ServerConfig.cli_fixed``) still beats
the file. Both go through :func:`pick`. Pure functions: no I/O, no logging;
the callers read the file, report errors and log the outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from irqd.config import HotLoop, MsixStrategy, ServerConfig, SimConfig, default_socket_path
from irqd.configfile import FileSettings

__all__ = [
    "REFUSED_REASON",
    "Defaults",
    "Flags",
    "ReloadPlan",
    "SettingsError",
    "pick",
    "reload_plan",
    "resolve",
]

_T = TypeVar("_T")

#: Why a reload leaves a setting as it is (``refused_reason`` in the log).
REFUSED_REASON = "only a restart can change these"


class SettingsError(ValueError):
    """Flags and file together ask for something that cannot work; the message names the flags."""


def pick(flag: _T | None, file: _T | None, default: _T) -> _T:
    """The rule itself: the flag if given, else the file's value if set, else the default."""
    if flag is not None:
        return flag
    return file if file is not None else default


@dataclass(frozen=True)
class Flags:
    """The ``serve`` flags; ``None`` for each one not given on the command line."""

    device: str | None = None
    #: ``--sim``: the simulated device, whatever the file says.
    sim: bool = False
    wait: bool | None = None
    socket_path: Path | None = None
    socket_mode: int | None = None
    msix_strategy: MsixStrategy | None = None
    msix_prearm: int | None = None
    hot_loop: HotLoop | None = None
    sim_vectors: int | None = None
    sim_noresize: bool | None = None
    sim_msi_vectors: int | None = None
    log_level: str | None = None
    log_format: str | None = None
    metrics_file: Path | None = None
    metrics_interval: float | None = None

    def given(self) -> frozenset[str]:
        """The ``ServerConfig`` fields set by a flag: a reload leaves them be."""
        return frozenset(
            name
            for name, value in (
                ("device", self.device),
                ("socket_path", self.socket_path),
                ("socket_mode", self.socket_mode),
                ("msix_strategy", self.msix_strategy),
                ("msix_prearm", self.msix_prearm),
                ("hot_loop", self.hot_loop),
                ("log_level", self.log_level),
                ("log_format", self.log_format),
                ("metrics_file", self.metrics_file),
                ("metrics_interval", self.metrics_interval),
            )
            if value is not None
        )


@dataclass(frozen=True)
class Defaults:
    """The built-in defaults: what applies when neither a flag nor the file says."""

    socket_mode: int = ServerConfig.socket_mode
    msix_strategy: MsixStrategy = ServerConfig.msix_strategy
    hot_loop: HotLoop = ServerConfig.hot_loop
    log_level: str = ServerConfig.log_level
    log_format: str = ServerConfig.log_format
    metrics_interval: float = ServerConfig.metrics_interval
    sim: SimConfig = ServerConfig.sim
    #: The socket path of an instance (``sim`` or the PCI address).
    socket_path: Callable[[str], Path] = default_socket_path


def resolve(
    flags: Flags, file: FileSettings | None, defaults: Defaults | None = None
) -> ServerConfig:
    """The config ``serve`` runs with.

    :class:`SettingsError` for flags (and file keys) that cannot work together.
    """
    file = file if file is not None else FileSettings()
    defaults = defaults if defaults is not None else Defaults()
    device = flags.device if flags.device is not None or flags.sim else file.device
    strategy = pick(flags.msix_strategy, file.msix_strategy, defaults.msix_strategy)
    prearm = pick(flags.msix_prearm, file.msix_prearm, None)
    _check_flags(flags, device, strategy, prearm)
    sim = SimConfig(
        msix_vectors=pick(flags.sim_vectors, file.sim_vectors, defaults.sim.msix_vectors),
        noresize=pick(flags.sim_noresize, file.sim_noresize, defaults.sim.noresize),
        msi_vectors=pick(flags.sim_msi_vectors, file.sim_msi_vectors, defaults.sim.msi_vectors),
    )
    if device is None:
        _check_sim(sim, strategy, prearm)
    socket_path = pick(flags.socket_path, file.socket_path, None)
    return ServerConfig(
        socket_path=socket_path
        if socket_path is not None
        else defaults.socket_path(device or "sim"),
        device=device,
        sim=sim,
        msix_strategy=strategy,
        msix_prearm=prearm,
        socket_mode=pick(flags.socket_mode, file.socket_mode, defaults.socket_mode),
        config_path=file.path,
        log_level=pick(flags.log_level, file.log_level, defaults.log_level),
        log_format=pick(flags.log_format, file.log_format, defaults.log_format),
        server_limits=file.server_limits,
        access_policy=file.access_policy,
        wait_for_device=pick(flags.wait or None, file.wait, False),
        hot_loop=pick(flags.hot_loop, file.hot_loop, defaults.hot_loop),
        metrics_file=pick(flags.metrics_file, file.metrics_file, None),
        metrics_interval=pick(
            flags.metrics_interval, file.metrics_interval, defaults.metrics_interval
        ),
        cli_fixed=flags.given(),
    )


def _check_flags(
    flags: Flags, device: str | None, strategy: MsixStrategy, prearm: int | None
) -> None:
    """``SettingsError`` for options that do not go with the device or the strategy."""
    sim_flags = [
        flag
        for flag, value in (
            ("--sim-vectors", flags.sim_vectors),
            ("--sim-noresize", flags.sim_noresize),
            ("--sim-msi-vectors", flags.sim_msi_vectors),
        )
        if value is not None
    ]
    if device is not None and sim_flags:
        raise SettingsError(
            f"{', '.join(sim_flags)}: only for the simulated device, not with --device"
        )
    if flags.wait and device is None:
        raise SettingsError(
            "--wait: waits for a real device to be bound to vfio-pci; give --device"
        )
    if prearm is not None and strategy not in (MsixStrategy.AUTO, MsixStrategy.PREARM):
        raise SettingsError(
            f"--msix-prearm only applies to --msix-strategy auto or prearm, not {strategy}"
        )


def _check_sim(sim: SimConfig, strategy: MsixStrategy, prearm: int | None) -> None:
    """``SettingsError`` for MSI-X settings the simulated device cannot take."""
    if prearm is not None and prearm > sim.msix_vectors:
        raise SettingsError(
            f"--msix-prearm {prearm} exceeds the MSI-X table (--sim-vectors {sim.msix_vectors})"
        )
    if strategy is MsixStrategy.DYNAMIC and sim.noresize:
        raise SettingsError(
            "--msix-strategy dynamic needs a kernel without NORESIZE, and --sim-noresize "
            "models one with it; use auto, prearm or grow"
        )


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload does: the new config, and what it changes, refuses and keeps."""

    #: The config to run with from now on.
    config: ServerConfig
    #: What changes, e.g. ``log.level=debug``, ``access``, ``limits``.
    changed: tuple[str, ...] = ()
    #: File keys whose new value only a restart can apply (``socket.path``, ...).
    refused: tuple[str, ...] = ()
    #: File keys a command-line flag still beats, with that reason.
    kept: tuple[str, ...] = ()

    @property
    def refused_reason(self) -> str | None:
        """:data:`REFUSED_REASON` if anything was refused, else ``None``."""
        return REFUSED_REASON if self.refused else None

    def log_fields(self) -> dict[str, Any]:
        """The fields of the ``config.reloaded`` log record, as lists."""
        return {
            "changed": list(self.changed),
            "refused": list(self.refused),
            "refused_reason": self.refused_reason,
            "kept": list(self.kept),
        }


def reload_plan(
    current: ServerConfig, file: FileSettings, defaults: Defaults | None = None
) -> ReloadPlan:
    """What re-reading the config file does to the running ``current`` config.

    The same rule as at start: a flag given on the command line (in
    ``current.cli_fixed``) beats the file, the file beats the default: a key
    the file no longer has goes back to its default. Only ``log.level``,
    ``[access]``, ``[limits]`` and ``[metrics]`` can change while running; a
    new value for another key is refused (reported, not applied).
    """
    defaults = defaults if defaults is not None else Defaults()
    fixed = current.cli_fixed
    changes: dict[str, Any] = {}
    changed: list[str] = []
    kept: list[str] = []
    flag_level = current.log_level if "log_level" in fixed else None
    level = pick(flag_level, file.log_level, defaults.log_level)
    if flag_level is not None:
        if file.log_level not in (None, current.log_level):
            kept.append("log.level (given on the command line)")
    elif level != current.log_level:
        changes["log_level"] = level
        changed.append(f"log.level={level}")
    # The metrics file and interval: rewritten by a loop that reads the
    # running config every round, so a new value applies from the next one.
    metrics: tuple[tuple[str, str, object, object], ...] = (
        ("metrics.file", "metrics_file", file.metrics_file, None),
        ("metrics.interval", "metrics_interval", file.metrics_interval, defaults.metrics_interval),
    )
    for key, attr, wanted, default in metrics:
        running = getattr(current, attr)
        if attr in fixed:
            if wanted not in (None, running):
                kept.append(f"{key} (given on the command line)")
            continue
        value = pick(None, wanted, default)
        if value != running:
            changes[attr] = value
            changed.append(f"{key}={value if value is not None else ''}")
    # No flag sets these: the file's table, or None for the built-in default.
    if file.access_policy != current.access_policy:
        changes["access_policy"] = file.access_policy
        changed.append("access")
    if file.server_limits != current.server_limits:
        changes["server_limits"] = file.server_limits
        changed.append("limits")
    # Only a restart can change these: (file key, ServerConfig field, file's, running).
    restart_only: tuple[tuple[str, str, object, object], ...] = (
        ("device", "device", file.device, current.device),
        ("socket.path", "socket_path", file.socket_path, current.socket_path),
        ("socket.mode", "socket_mode", file.socket_mode, current.socket_mode),
        ("msix.strategy", "msix_strategy", file.msix_strategy, current.msix_strategy),
        ("msix.prearm", "msix_prearm", file.msix_prearm, current.msix_prearm),
        ("hot_loop", "hot_loop", file.hot_loop, current.hot_loop),
        ("log.format", "log_format", file.log_format, current.log_format),
    )
    refused = tuple(
        key
        for key, attr, wanted, running in restart_only
        if wanted is not None and wanted != running and attr not in fixed
    )
    return ReloadPlan(replace(current, **changes), tuple(changed), refused, tuple(kept))
