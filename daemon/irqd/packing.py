"""msgpack maps some of whose values are packed already.

A record that is written again after every change (the ``live-state``,
irqd.process.crashstate) is mostly made of parts that did not change; those
parts are kept as msgpack bytes and spliced in (:class:`Packed`). The result
decodes as if the whole map had been given to ``msgpack.packb`` (a map is a
header followed by its keys and values, each packed on its own: the msgpack
specification, "map format family").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgpack

__all__ = ["Packed", "pack_map"]


@dataclass(frozen=True)
class Packed:
    """A value that is msgpack bytes already: :func:`pack_map` writes it as it is."""

    data: bytes


def pack_map(fields: Mapping[str, object]) -> bytes:
    """``fields`` as one msgpack map, in their order; a :class:`Packed` value is
    spliced in unchanged, any other is packed (``use_bin_type=True``)."""
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack_map_header(len(fields))]
    for key, value in fields.items():
        parts.append(packer.pack(key))
        parts.append(value.data if isinstance(value, Packed) else packer.pack(value))
    return b"".join(parts)
