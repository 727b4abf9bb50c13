"""The daemon's settings, as one immutable value built from flags, config file and defaults.

``irqd.settings`` holds the one rule that builds it ("a flag beats the file,
the file beats the built-in default"), for ``serve`` and for a reload alike.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from irqd.limits import ServerLimits
from irqd.policy import AccessPolicy

#: Where sockets live unless ``--socket`` or ``$VFIO_IRQD_SOCKET`` says otherwise.
DEFAULT_SOCKET_DIR = Path("/run/vfio-irqd")

#: Environment variable that overrides the default socket path for every command.
SOCKET_ENV = "VFIO_IRQD_SOCKET"

#: Upper bound on the pre-armed MSI-X range when ``--msix-prearm`` is not given:
#: pre-arming costs one host vector per entry, and a 2048-entry table per device
#: exhausts a host quickly (github.com/cloud-hypervisor/cloud-hypervisor/issues/7079
#: saw it with 257 per VF).
DEFAULT_PREARM_CAP = 64

#: Seconds between two rewrites of ``--metrics-file`` unless ``--metrics-interval`` says.
DEFAULT_METRICS_INTERVAL = 5.0


class MsixStrategy(enum.StrEnum):
    """How MSI-X vectors are added to a running device (docs/design.md, the MSI-X strategies)."""

    AUTO = "auto"
    DYNAMIC = "dynamic"
    PREARM = "prearm"
    GROW = "grow"


class HotLoop(enum.StrEnum):
    """``--hot-loop``: what forwards interrupts to the clients (irqd.hotpath.native)."""

    #: ``native`` when the extension ``irqd._hotloop`` is built, else ``python``.
    AUTO = "auto"
    #: The extension's own thread: eventfd to socket without entering Python.
    NATIVE = "native"
    #: A Trio task draining one epoll set (irqd.hotpath.dispatcher); the reference.
    PYTHON = "python"


def default_socket_path(instance: str) -> Path:
    """``$VFIO_IRQD_SOCKET`` if set, else ``/run/vfio-irqd/<instance>.sock``."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    return DEFAULT_SOCKET_DIR / f"{instance}.sock"


@dataclass(frozen=True)
class SimConfig:
    """Shape of the simulated device."""

    msix_vectors: int = 64
    noresize: bool = False
    msi_vectors: int = 1
    intx: bool = True


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``serve`` needs to run."""

    socket_path: Path
    #: PCI address of a real device; ``None`` runs the simulated device.
    device: str | None = None
    sim: SimConfig = SimConfig()
    msix_strategy: MsixStrategy = MsixStrategy.AUTO
    #: Size of the pre-armed MSI-X range; ``None`` means the whole table up to
    #: ``DEFAULT_PREARM_CAP``.
    msix_prearm: int | None = None
    #: Permission bits of the listening socket, applied atomically at bind time.
    socket_mode: int = 0o660
    # -- service settings: config file, logging, reload ---------------------------
    #: The config file the settings came from; SIGHUP reads it again.
    config_path: Path | None = None
    #: ``--log-level`` / ``[log] level``; SIGHUP may change it.
    log_level: str = "info"
    #: ``--log-format`` / ``[log] format``.
    log_format: str = "auto"
    #: ``[limits]``; ``None``: the built-in defaults. SIGHUP may change it.
    server_limits: ServerLimits | None = None
    #: ``[access]``; ``None``: the built-in default. SIGHUP may change it.
    access_policy: AccessPolicy | None = None
    #: ``--wait``: wait until the device is bound to vfio-pci before opening it.
    wait_for_device: bool = False
    #: ``--hot-loop`` / ``hot_loop``: fixed at start (a restart changes it).
    hot_loop: HotLoop = HotLoop.AUTO
    #: ``--metrics-file`` / ``[metrics] file``: the Prometheus textfile rewritten
    #: every ``metrics_interval`` (irqd.metrics); ``None``: none. SIGHUP may change both.
    metrics_file: Path | None = None
    metrics_interval: float = DEFAULT_METRICS_INTERVAL
    #: Upper bound on an orderly stop (SIGTERM to exit).
    stop_timeout: float = 5.0
    #: Settings given on the command line (field names); a reload leaves them be.
    cli_fixed: frozenset[str] = frozenset()

    @property
    def instance(self) -> str:
        """The name of this daemon instance: the PCI address, or ``sim``."""
        return self.device if self.device is not None else "sim"
