"""A state record that a process killed at any instant leaves readable: the ``live-state`` memfd.

The fd store (irqd.process.livestore) keeps one memfd for the whole life of
the daemon; after a SIGKILL, a crash or a watchdog kill the next process
reads from it what the dead one last recorded. Any instruction of the
writer may be its last, so an update never overwrites what the file
currently says:

* offset 0 holds a small header (:data:`HEADER`): magic, layout version,
  generation, offset, length and CRC-32 of the current record;
* each update ``pwrite``\\ s the new msgpack record into a region that does
  not overlap the current one (at :data:`DATA_START` if it fits before the
  current record, else right after it), and only then ``pwrite``\\ s the
  header, one small write inside the first page.

A process that dies before the header write leaves the previous header,
which still names the previous record, untouched; one that dies after it
has written the new record whole. The header itself is one write of a few
dozen bytes into the first page of a shmem file: ``generic_perform_write``
(``mm/filemap.c``, which shmem's ``write_iter`` uses) looks for a fatal
signal only between page-sized chunks, so a write inside one page is either
done whole or not at all. The CRC catches anything else (a file that is not ours, a bug).

Nothing is sealed (the file is written again and again) and nothing is
``fsync``\\ ed: it lives in memory, held by the service manager, and only has
to outlive the process, not the machine.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any

import msgpack

__all__ = [
    "DATA_START",
    "HEADER",
    "MAGIC",
    "CrashStateError",
    "CrashStateWriter",
    "read_crash_state",
]

#: First bytes of the file: what it is.
MAGIC = b"IRQDLIV1"
#: Layout of the header: magic, layout version, generation, offset, length, CRC-32.
HEADER = struct.Struct("<8sIQQQI")
#: Bumped when the header's layout changes.
LAYOUT_VERSION = 1
#: Records start on the second page: the header's page is written alone.
DATA_START = 4096


class CrashStateError(Exception):
    """The file holds no usable record (empty, torn beyond repair, not ours)."""


class CrashStateWriter:
    """Writes records into one memfd, each crash-consistently (see the module docstring).

    The writer owns the fd; the fd store gets it once (``fileno``).
    """

    def __init__(self, fd: int, *, generation: int = 0, current: tuple[int, int] = (0, 0)) -> None:
        """Write into ``fd`` (owned from now on); ``generation`` and ``current``
        (offset, length) describe what it holds already (``adopt``)."""
        self._fd = fd
        self.generation = generation
        self._current = current
        self._last: bytes | None = None
        #: Records actually written (not skipped as unchanged).
        self.writes = 0

    @classmethod
    def create(cls) -> CrashStateWriter:
        """A writer on a new, empty memfd."""
        return cls(os.memfd_create("vfio-irqd-live-state", os.MFD_CLOEXEC))

    @classmethod
    def adopt(cls, fd: int) -> CrashStateWriter:
        """A writer that carries on in ``fd``, written by a previous process; the
        current record stays where it is until a new one replaces it. A file with
        no usable header is started over (its records are never read again)."""
        try:
            generation, offset, length, _ = _header(fd)
        except CrashStateError:
            return cls(fd)
        return cls(fd, generation=generation, current=(offset, length))

    def fileno(self) -> int:
        """The memfd (the writer's; the fd store gets a copy with each ``FDSTORE=1``)."""
        return self._fd

    def write(self, record: dict[str, Any]) -> bool:
        """Make ``record`` the current one; ``False`` when its bytes equal the last ones
        (nothing written)."""
        return self.write_packed(msgpack.packb(record, use_bin_type=True))

    def write_packed(self, data: bytes) -> bool:
        """``write`` for a record packed already: ``data`` must be one msgpack map."""
        if data == self._last:
            return False
        offset = self._place(len(data))
        _pwrite_all(self._fd, data, offset)
        # The new record is whole in the file before the header names it.
        self.generation += 1
        header = HEADER.pack(
            MAGIC, LAYOUT_VERSION, self.generation, offset, len(data), zlib.crc32(data)
        )
        _pwrite_all(self._fd, header, 0)
        self._current = (offset, len(data))
        self._last = data
        self.writes += 1
        return True

    def _place(self, length: int) -> int:
        """Where a record of ``length`` bytes goes without touching the current one."""
        current_offset, current_length = self._current
        if current_length == 0 or DATA_START + length <= current_offset:
            return DATA_START
        return current_offset + current_length

    def close(self) -> None:
        """Close the memfd (the fd store may still hold its own reference)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _header(fd: int) -> tuple[int, int, int, int]:
    """(generation, offset, length, crc) of the header in ``fd``."""
    raw = os.pread(fd, HEADER.size, 0)
    if len(raw) < HEADER.size:
        raise CrashStateError(f"the file is {len(raw)} bytes long: no header")
    magic, layout, generation, offset, length, crc = HEADER.unpack(raw)
    if magic != MAGIC:
        raise CrashStateError(f"not a live-state file (magic {magic!r})")
    if layout != LAYOUT_VERSION:
        raise CrashStateError(f"header layout {layout}; this daemon reads {LAYOUT_VERSION}")
    if offset < DATA_START or length == 0:
        raise CrashStateError(f"the header names no record (offset {offset}, length {length})")
    return generation, offset, length, crc


def read_crash_state(fd: int) -> tuple[int, dict[str, Any]]:
    """(generation, record) of the current record in ``fd``; ``CrashStateError`` if
    there is none that is whole. Does not close ``fd``."""
    generation, offset, length, crc = _header(fd)
    size = os.fstat(fd).st_size
    if offset + length > size:
        raise CrashStateError(f"the record at {offset}+{length} runs past the end ({size})")
    data = os.pread(fd, length, offset)
    if len(data) != length or zlib.crc32(data) != crc:
        raise CrashStateError("the record does not match its header's CRC-32")
    try:
        record = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # anything msgpack raises means the bytes are bad
        raise CrashStateError(f"the record is not readable: {exc}") from exc
    if not isinstance(record, dict):
        raise CrashStateError("the record is not a map")
    return generation, record
