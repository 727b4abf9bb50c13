"""vfio-irqd: owns a VFIO PCI device and fans its interrupts out to client processes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vfio-irqd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
