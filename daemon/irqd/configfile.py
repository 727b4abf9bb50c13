"""The per-instance config file, ``/etc/vfio-irqd/<instance>.toml`` (or ``--config PATH``).

Every key is optional; a command-line flag given explicitly wins over the file,
and the file wins over the built-in default. Unknown keys are errors, so a
typo never silently falls back to a default. The schema (docs/operations.md)::

    device = "0000:03:00.0"      # PCI address; absent: the simulated device
    wait = false                  # wait until the device is bound to vfio-pci

    [socket]
    path = "/run/vfio-irqd/0000:03:00.0.sock"
    mode = "0660"                 # octal, as a string (or a TOML 0o660 integer)

    [msix]
    strategy = "auto"             # auto | dynamic | prearm | grow
    prearm = 64                   # vectors armed up front (prearm)

    [sim]                         # only without `device`
    vectors = 64
    noresize = false
    msi_vectors = 1

    [limits]                      # irqd.limits.ServerLimits keys; reloadable (SIGHUP)
    [access]                      # irqd.policy.AccessPolicy schema; reloadable

    [metrics]                     # Prometheus textfile (docs/metrics.md); reloadable
    file = "/var/lib/prometheus/node-exporter/vfio-irqd-0000:03:00.0.prom"
    interval = 5                  # seconds between rewrites

    [log]
    level = "info"                # debug | info | warning | error; reloadable
    format = "auto"               # auto | json | console

Every error is one :class:`ConfigFileError` naming the file, the key and the reason.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from irqd.config import HotLoop, MsixStrategy
from irqd.limits import LimitsError, ServerLimits
from irqd.policy import AccessPolicy, AccessPolicyError

__all__ = [
    "DEFAULT_CONFIG_DIR",
    "ConfigFileError",
    "FileSettings",
    "default_config_path",
    "load_settings",
]

_T = TypeVar("_T")

#: Where ``<instance>.toml`` is looked for when ``--config`` is not given.
DEFAULT_CONFIG_DIR = Path("/etc/vfio-irqd")

#: Mirrors cli.MAX_MSIX_VECTORS / MAX_MSI_VECTORS (PCI limits).
_MAX_MSIX = 2048
_MAX_MSI = 32

_BDF_RE = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
_LEVELS = ("debug", "info", "warning", "error")
_FORMATS = ("auto", "json", "console", "journal")


class ConfigFileError(Exception):
    """A config file that cannot be used: ``file: key: reason``."""

    def __init__(self, path: Path, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + reason)


@dataclass(frozen=True)
class FileSettings:
    """What a config file says; ``None`` (or empty) for every key it leaves out."""

    path: Path | None = None
    device: str | None = None
    wait: bool | None = None
    socket_path: Path | None = None
    socket_mode: int | None = None
    msix_strategy: MsixStrategy | None = None
    msix_prearm: int | None = None
    hot_loop: HotLoop | None = None
    sim_vectors: int | None = None
    sim_noresize: bool | None = None
    sim_msi_vectors: int | None = None
    #: ``[limits]`` through ``irqd.limits.ServerLimits.from_mapping``.
    server_limits: ServerLimits | None = None
    #: ``[access]`` through ``irqd.policy.AccessPolicy.from_mapping``.
    access_policy: AccessPolicy | None = None
    log_level: str | None = None
    log_format: str | None = None
    metrics_file: Path | None = None
    metrics_interval: float | None = None


def default_config_path(instance: str) -> Path:
    """``/etc/vfio-irqd/<instance>.toml``."""
    return DEFAULT_CONFIG_DIR / f"{instance}.toml"


class _Reader:
    """Takes keys out of one table, checking each; what is left over is an error."""

    def __init__(self, path: Path, table: Mapping[str, Any], prefix: str = "") -> None:
        self.path = path
        self.table = dict(table)
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def fail(self, name: str, reason: str) -> ConfigFileError:
        return ConfigFileError(self.path, self.key(name), reason)

    def sub(self, name: str) -> _Reader | None:
        value = self.table.pop(name, None)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(name, f"must be a table ([{self.key(name)}]), not {_kind(value)}")
        return _Reader(self.path, value, f"{self.key(name)}.")

    def raw_table(self, name: str) -> dict[str, Any] | None:
        value = self.table.pop(name, None)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(name, f"must be a table, not {_kind(value)}")
        return value

    def get(self, name: str, convert: Callable[[Any], Any]) -> Any:
        if name not in self.table:
            return None
        value = self.table.pop(name)
        try:
            return convert(value)
        except (ValueError, TypeError) as exc:
            raise self.fail(name, str(exc)) from None

    def finish(self) -> None:
        for name in self.table:
            raise self.fail(name, "unknown key")


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", str: "a string", float: "a number"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"must be true or false, not {_kind(value)}")
    return value


def _int_in(low: int, high: int | None = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"must be an integer, not {_kind(value)}")
        if value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise ValueError(f"{value} is out of range ({bound})")
        return value

    return convert


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    return convert


def _bdf(value: Any) -> str:
    if not isinstance(value, str) or (match := _BDF_RE.match(value.strip())) is None:
        raise ValueError(f"{value!r} is not a PCI address like 0000:03:00.0")
    domain, bus, slot, func = match.groups()
    return f"{(domain or '0000').lower()}:{bus.lower()}:{slot.lower()}.{func}"


def _mode(value: Any) -> int:
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError(f'{value!r} is not an octal mode like "0660"') from None
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise TypeError(f'must be an octal string like "0660", not {_kind(value)}')
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{value!r} is out of range (0000..0777)")
    return mode


def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"must be an absolute path, not {value!r}")
    return Path(value)


def _interval(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"must be a number of seconds, not {_kind(value)}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{value} must be a positive number of seconds")
    return float(value)


def load_settings(path: Path) -> FileSettings:
    """Read and check ``path``; :class:`ConfigFileError` for anything wrong with it."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigFileError(path, "", "no such file") from None
    except PermissionError:
        raise ConfigFileError(path, "", "permission denied") from None
    except IsADirectoryError:
        raise ConfigFileError(path, "", "is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(path, "", f"not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigFileError(path, "", "not valid UTF-8") from None
    top = _Reader(path, data)
    settings: dict[str, Any] = {
        "path": path,
        "device": top.get("device", _bdf),
        "wait": top.get("wait", _bool),
    }
    hot_loop = top.get("hot_loop", _choice(tuple(h.value for h in HotLoop)))
    settings["hot_loop"] = HotLoop(hot_loop) if hot_loop is not None else None
    if (sock := top.sub("socket")) is not None:
        settings["socket_path"] = sock.get("path", _path)
        settings["socket_mode"] = sock.get("mode", _mode)
        sock.finish()
    if (msix := top.sub("msix")) is not None:
        strategy = msix.get("strategy", _choice(tuple(s.value for s in MsixStrategy)))
        settings["msix_strategy"] = MsixStrategy(strategy) if strategy is not None else None
        settings["msix_prearm"] = msix.get("prearm", _int_in(1, _MAX_MSIX))
        msix.finish()
        if settings["msix_prearm"] is not None and strategy not in (None, "auto", "prearm"):
            raise msix.fail("prearm", f"only applies to strategy auto or prearm, not {strategy}")
    if (sim := top.sub("sim")) is not None:
        if settings["device"] is not None:
            raise top.fail("sim", "only for the simulated device, not with device =")
        settings["sim_vectors"] = sim.get("vectors", _int_in(1, _MAX_MSIX))
        settings["sim_noresize"] = sim.get("noresize", _bool)
        settings["sim_msi_vectors"] = sim.get("msi_vectors", _int_in(1, _MAX_MSI))
        sim.finish()
    settings["server_limits"] = _from_mapping(
        path, "limits", top.raw_table("limits"), ServerLimits.from_mapping
    )
    settings["access_policy"] = _from_mapping(
        path, "access", top.raw_table("access"), AccessPolicy.from_mapping
    )
    if (metrics := top.sub("metrics")) is not None:
        settings["metrics_file"] = metrics.get("file", _path)
        settings["metrics_interval"] = metrics.get("interval", _interval)
        metrics.finish()
    if (logs := top.sub("log")) is not None:
        settings["log_level"] = logs.get("level", _choice(_LEVELS))
        settings["log_format"] = logs.get("format", _choice(_FORMATS))
        logs.finish()
    top.finish()
    return FileSettings(**settings)


def _from_mapping(
    path: Path,
    key: str,
    mapping: dict[str, Any] | None,
    from_mapping: Callable[[Mapping[str, Any]], _T],
) -> _T | None:
    """``from_mapping(mapping)``, or ``None`` for a table the file leaves out.

    ``irqd.limits`` and ``irqd.policy`` own what ``[limits]`` and ``[access]``
    mean; their refusal (``LimitsError``/``AccessPolicyError`` naming the key,
    or a ``ValueError``/``TypeError``/``KeyError`` from a value they did not
    expect) becomes a :class:`ConfigFileError`.
    """
    if mapping is None:
        return None
    try:
        return from_mapping(mapping)
    except (LimitsError, AccessPolicyError) as exc:
        raise ConfigFileError(path, exc.key, exc.detail) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigFileError(path, key, str(exc)) from None
