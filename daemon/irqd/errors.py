"""Errors the daemon answers a client with, each carrying a protocol error code.

The codes are :class:`irqproto.errors.ErrorCode` members (strings on the
wire); the kernel's errno numbers of a failed device call are translated to
them once, in :func:`device_error`. The module-level ``EINVAL`` … are the
enum's members under their old names.
"""

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
    ErrorCode,
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
    "ErrorCode",
    "IrqdError",
    "device_error",
]

#: The kernel's errno of a failed device call -> the code the client gets.
_ERRNO_CODES: dict[int, ErrorCode] = {
    errno.EINVAL: ErrorCode.EINVAL,
    errno.ENOSPC: ErrorCode.ENOSPC,
    errno.EBUSY: ErrorCode.EBUSY,
    errno.EACCES: ErrorCode.EACCES,
    errno.EPERM: ErrorCode.EACCES,
    errno.ENODEV: ErrorCode.ENODEV,
    errno.ENXIO: ErrorCode.ENODEV,
    errno.E2BIG: ErrorCode.E2BIG,
}


class IrqdError(Exception):
    """A request could not be carried out; ``code`` is the protocol error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def device_error(exc: OSError, what: str) -> IrqdError:
    """Translate a failed device call into the error the client gets."""
    code = _ERRNO_CODES.get(exc.errno or 0, ErrorCode.EIO)
    reason = exc.strerror or str(exc)
    return IrqdError(code, f"{what}: {reason}")


class ConfigError(Exception):
    """The daemon's settings cannot work with this device; reported at start-up."""
