"""Getting hold of a VFIO device: opening it afresh, or adopting a previous process's fds.

Opening follows the legacy group/container path that every kernel since 3.6
has (include/uapi/linux/vfio.h, Documentation/driver-api/vfio.rst):

1. ``/sys/bus/pci/devices/BDF/driver`` must be ``vfio-pci``;
2. ``/sys/bus/pci/devices/BDF/iommu_group`` names the group N → ``/dev/vfio/N``;
3. the group must be viable (every device in it bound to vfio-pci or to nothing);
4. a container ``/dev/vfio/vfio`` is attached and given the type1v2 IOMMU
   (``VFIO_SET_IOMMU``; EPERM there means no interrupt remapping);
5. ``VFIO_GROUP_GET_DEVICE_FD`` with the PCI address gives the device fd.

The cdev/iommufd interface (6.6+, ``/dev/vfio/devices/vfioN``) is not used:
where a kernel offers only that, opening fails with a message saying so.

Each usual mistake is its own ``VfioOpenError`` subclass whose message says
what to do; the kernel's errno is kept on it (``.errno``) and as the cause.

Adopting (restart without disarming, irqd.process.fdstore) opens nothing: the
handed-over fds are only checked to be what they claim.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from irqd.errors import ConfigError

from . import vfio_ioctl as io
from .base import AdoptError

SYSFS_PCI_DEVICES = Path("/sys/bus/pci/devices")
DEV_VFIO = Path("/dev/vfio")


#: The keys of ``handover_fds``/``adopt``: every fd that keeps the device open.
HANDOVER_KEYS = ("container", "group", "device")


class VfioAdoptError(AdoptError):
    """Fds handed over by a previous daemon process cannot be taken as this device.

    A ``ValueError`` (not a ``ConfigError``): the daemon logs it and opens the
    device afresh instead of refusing to start.
    """


class VfioOpenError(ConfigError):
    """The device could not be opened; the message says what to do about it."""

    def __init__(self, code: int | None, message: str) -> None:
        # The kernel's errno first, then the message, as OSError takes them.
        super().__init__(message)
        #: The kernel's errno, when one was behind it.
        self.errno = code


class DeviceNotFoundError(VfioOpenError):
    """No PCI device at that address."""


class NotBoundToVfioError(VfioOpenError):
    """The device is bound to another driver, or to none."""


class NoIommuGroupError(VfioOpenError):
    """The device has no IOMMU group (no IOMMU enabled, or only the cdev interface)."""


class GroupNotViableError(VfioOpenError):
    """Another device in the same IOMMU group is bound to a non-VFIO driver."""


class VfioPermissionError(VfioOpenError):
    """EACCES/EPERM opening ``/dev/vfio/N`` or ``/dev/vfio/vfio``."""


class DeviceBusyError(VfioOpenError):
    """EBUSY: another process holds the group or the device."""


class NoInterruptRemappingError(VfioOpenError):
    """``VFIO_SET_IOMMU`` gave EPERM: the platform has no interrupt remapping."""


@dataclass
class OpenFds:
    """The three fds that keep a VFIO device open; -1 for one not (or no longer) held."""

    container: int = -1
    group: int = -1
    device: int = -1

    def close(self) -> None:
        """Close the device, the group and the container, in that order."""
        for fd in (self.device, self.group, self.container):
            close_quietly(fd)
        self.device = self.group = self.container = -1


def open_path(path: Path, bdf: str) -> int:
    """Open a VFIO character device; each usual refusal becomes its ``VfioOpenError``."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError as exc:
        raise VfioPermissionError(
            exc.errno,
            f"{bdf}: {exc.strerror} opening {path}: run the daemon as root, or give its user "
            f'the device (e.g. a udev rule: SUBSYSTEM=="vfio", OWNER="vfio-irqd") and '
            "enough RLIMIT_MEMLOCK",
        ) from exc
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise DeviceBusyError(
                exc.errno,
                f"{bdf}: {path} is held by another process (EBUSY); only one process can own "
                "a VFIO group: stop the other user (another vfio-irqd, QEMU, DPDK) first",
            ) from exc
        if exc.errno == errno.ENOENT:
            raise VfioOpenError(
                exc.errno,
                f"{bdf}: {path} does not exist: load the vfio modules "
                "(modprobe vfio-pci) and check that the device is bound to vfio-pci",
            ) from exc
        raise


def group_number_of(group_fd: int) -> int | None:
    """The N of the ``/dev/vfio/N`` an fd has open; ``None`` if it is no such file.

    Matched by device number against the nodes in ``/dev/vfio``, not by the
    path ``/proc/self/fd`` shows: an fd opened by an earlier start of a
    sandboxed unit lives on that start's own mount of ``/dev`` (each start gets
    a new mount namespace), and the kernel then shows its path inside the
    devtmpfs (``/vfio/3``), not ``/dev/vfio/3``.
    """
    try:
        st = os.fstat(group_fd)
        names = os.listdir(DEV_VFIO)
    except OSError:
        return None
    if not stat.S_ISCHR(st.st_mode):
        return None
    for name in names:
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.stat(DEV_VFIO / name).st_rdev == st.st_rdev:
                return int(name)
    return None


def close_quietly(fd: int) -> None:
    """Close ``fd`` unless it is -1, ignoring errors (the fd is gone either way)."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def find_group(bdf: str, sysdev: Path) -> int:
    """The IOMMU group number of ``bdf`` (its sysfs directory ``sysdev``), after checking
    that it is bound to vfio-pci; each usual mistake is its own ``VfioOpenError``."""
    if not sysdev.exists():
        raise DeviceNotFoundError(
            errno.ENODEV,
            f"{bdf}: no such PCI device (nothing at {sysdev}); check the address with lspci -D",
        )
    driver_link = sysdev / "driver"
    driver = driver_link.resolve().name if driver_link.exists() else None
    if driver != "vfio-pci":
        bound = f"bound to {driver}" if driver else "bound to no driver"
        raise NotBoundToVfioError(
            errno.ENODEV,
            f"{bdf}: {bound}, not vfio-pci. Bind it: "
            f"echo vfio-pci > {sysdev}/driver_override; "
            + (f"echo {bdf} > {driver_link}/unbind; " if driver else "")
            + f"echo {bdf} > /sys/bus/pci/drivers_probe "
            "(or driverctl set-override "
            f"{bdf} vfio-pci)",
        )
    group_link = sysdev / "iommu_group"
    if not group_link.exists():
        if (sysdev / "vfio-dev").exists():
            raise NoIommuGroupError(
                errno.ENODEV,
                f"{bdf}: the kernel offers only the VFIO cdev/iommufd interface "
                "(/dev/vfio/devices/vfioN), which this build does not use; use a kernel "
                "with CONFIG_VFIO_GROUP=y",
            )
        raise NoIommuGroupError(
            errno.ENODEV,
            f"{bdf}: no IOMMU group. Enable the IOMMU in the firmware (VT-d / AMD-Vi) and "
            "on the kernel command line (intel_iommu=on or amd_iommu=on); no-IOMMU mode "
            "is not supported",
        )
    return int(group_link.resolve().name)


def open_device(bdf: str, group_number: int, dev_vfio: Path = DEV_VFIO) -> OpenFds:
    """Open group ``group_number``, attach a type1v2 container, get ``bdf``'s device fd.

    On failure everything opened so far is closed again.
    """
    fds = OpenFds()
    try:
        _open_into(fds, bdf, group_number, dev_vfio)
    except BaseException:
        fds.close()
        raise
    return fds


def _open_into(fds: OpenFds, bdf: str, group_number: int, dev_vfio: Path) -> None:
    fds.group = open_path(dev_vfio / str(group_number), bdf)
    status = io.group_get_status(fds.group)
    if not status.viable:
        raise GroupNotViableError(
            errno.EPERM,
            f"{bdf}: IOMMU group {group_number} is not viable: every device in "
            f"/sys/kernel/iommu_groups/{group_number}/devices must be bound to "
            "vfio-pci (or to no driver); bind or unbind the others, or move the device "
            "to a slot with its own group",
        )
    fds.container = open_path(dev_vfio / "vfio", bdf)
    version = io.get_api_version(fds.container)
    if version != io.VFIO_API_VERSION:
        raise VfioOpenError(None, f"{bdf}: unknown VFIO API version {version}")
    if not io.check_extension(fds.container, io.VFIO_TYPE1v2_IOMMU):
        raise VfioOpenError(
            errno.ENOTSUP,
            f"{bdf}: the kernel's VFIO container has no type1v2 IOMMU: modprobe vfio_iommu_type1",
        )
    io.group_set_container(fds.group, fds.container)
    try:
        io.set_iommu(fds.container, io.VFIO_TYPE1v2_IOMMU)
    except PermissionError as exc:
        raise NoInterruptRemappingError(
            exc.errno,
            f"{bdf}: VFIO_SET_IOMMU refused (EPERM): the platform has no interrupt "
            "remapping, so a device could forge interrupts. Enable it (VT-d with "
            "interrupt remapping in the firmware; on a VM, intel-iommu,intremap=on), "
            "or accept the risk with the vfio_iommu_type1 module parameter "
            "allow_unsafe_interrupts=1",
        ) from exc
    try:
        fds.device = io.group_get_device_fd(fds.group, bdf)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise DeviceBusyError(
                exc.errno,
                f"{bdf}: the device is already open (EBUSY): stop its other user",
            ) from exc
        raise


def check_adopted(
    bdf: str, fds: Mapping[str, int], state: Mapping[str, Any] | None
) -> tuple[OpenFds, int, io.DeviceInfo]:
    """Check that handed-over ``fds`` are ``bdf``'s container, group and device, with
    read-only ioctls only; returns them, the group number and the device info.

    ``VfioAdoptError`` says which check failed; the fds are left to the caller.
    """
    missing = [key for key in HANDOVER_KEYS if key not in fds]
    if missing:
        raise VfioAdoptError(
            f"{bdf}: the handed-over device lacks its {', '.join(missing)} fd "
            f"(got {sorted(fds) or 'none'}); it cannot be adopted"
        )
    extra = sorted(set(fds) - set(HANDOVER_KEYS))
    if extra:
        raise VfioAdoptError(f"{bdf}: unknown handed-over device fds {extra}")
    if state is not None and state.get("bdf") != bdf:
        raise VfioAdoptError(
            f"{bdf}: the handed-over device is {state.get('bdf')!r}, not the configured one"
        )
    container, group, device = (fds[key] for key in HANDOVER_KEYS)
    try:
        version = io.get_api_version(container)
        status = io.group_get_status(group)
        info = io.device_get_info(device)
    except OSError as exc:
        raise VfioAdoptError(
            f"{bdf}: a handed-over fd is not the VFIO object it is named after ({exc.strerror})"
        ) from exc
    if version != io.VFIO_API_VERSION:
        raise VfioAdoptError(f"{bdf}: the handed-over container has API version {version}")
    if not (status.viable and status.container_set):
        raise VfioAdoptError(
            f"{bdf}: the handed-over group is not viable or has no container attached"
        )
    if not info.pci:
        raise VfioAdoptError(f"{bdf}: the handed-over device fd is not a PCI device")
    number = group_number_of(group)
    if number is None:
        raise VfioAdoptError(f"{bdf}: the handed-over group fd is not a /dev/vfio/N file")
    if state is not None and state.get("group") != number:
        raise VfioAdoptError(
            f"{bdf}: the handed-over group fd is group {number}, "
            f"the stored state says {state.get('group')!r}"
        )
    return OpenFds(container, group, device), number, info
