"""Hard limits on what the decoder accepts, and the vector range.

A peer that exceeds a limit gets :data:`~irqproto.errors.E2BIG` and loses its
connection: the limits bound the memory and CPU one connection can cost.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["CLIENT_LIMITS", "MAX_VECTOR", "MAX_VECTORS_PER_REQUEST", "Limits"]

#: Highest vector number: the PCI MSI-X table holds at most 2048 entries.
MAX_VECTOR = 2047
#: A request names each vector at most once, so at most the whole table.
MAX_VECTORS_PER_REQUEST = MAX_VECTOR + 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Decoder limits; the defaults are what the daemon and clients use.

    Attributes:
        max_message_size: bytes of one encoded message. 64 KiB holds an ``irq``
            notification for every vector (about 25 KiB) with room to spare.
        max_array_len: items of one array. 4096 is exactly an ``irq``
            notification for 2048 vectors (vector, count pairs, flattened).
        max_map_len: key/value pairs of one map.
        max_str_len: bytes of one string (keys included).
        max_bin_len: bytes of one binary blob.
        max_depth: nesting of arrays and maps, the message envelope included:
            ``[0, 1, "hello", [{...}]]`` has depth 3.
    """

    max_message_size: int = 64 * 1024
    max_array_len: int = 4096
    max_map_len: int = 64
    max_str_len: int = 4096
    max_bin_len: int = 64 * 1024
    max_depth: int = 8

    def __post_init__(self) -> None:
        for field in fields(self):
            name = field.name
            value = getattr(self, name)
            # bool is an int, but Limits(max_depth=True) is surely a mistake.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


#: What clients accept from the server by default. The server is trusted more
#: than a client is, and ``stats`` for 2048 vectors and many clients runs past
#: 64 KiB, so these are larger; they still bound a broken server's cost.
CLIENT_LIMITS = Limits(
    max_message_size=16 * 1024 * 1024,
    max_array_len=1 << 20,
    max_map_len=4096,
    max_str_len=1 << 20,
    max_bin_len=16 * 1024 * 1024,
    max_depth=16,
)
