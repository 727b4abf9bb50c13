"""Errors the daemon answers a client with, each carrying a protocol error code."""

from __future__ import annotations

import errno

from irqproto.errors import (
    E2BIG,
    EACCES,
    EBUSY,
    EINVAL,
    EIO,
    ENODEV,
    ENOSPC,
    ENOSYS,
    EPROTO,
)

__all__ = [
    "E2BIG",
    "EACCES",
    "EBUSY",
    "EINVAL",
    "EIO",
    "ENODEV",
    "ENOSPC",
    "ENOSYS",
    "EPROTO",
    "ConfigError",
    "IrqdError",
    "device_error",
]

_ERRNO_CODES = {
    errno.EINVAL: EINVAL,
    errno.ENOSPC: ENOSPC,
    errno.EBUSY: EBUSY,
    errno.EACCES: EACCES,
    errno.EPERM: EACCES,
    errno.ENODEV: ENODEV,
    errno.ENXIO: ENODEV,
    errno.E2BIG: E2BIG,
}


class IrqdError(Exception):
    """A request could not be carried out; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def device_error(exc: OSError, what: str) -> IrqdError:
    """Translate a failed device call into the error the client gets."""
    code = _ERRNO_CODES.get(exc.errno or 0, EIO)
    reason = exc.strerror or str(exc)
    return IrqdError(code, f"{what}: {reason}")


class ConfigError(Exception):
    """The daemon's settings cannot work with this device; reported at start-up."""
