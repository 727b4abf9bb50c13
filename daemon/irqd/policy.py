"""Who may do what: the access policy, a pure function of the peer's credentials.

The kernel tells the daemon who is on the other end of each connection
(``SO_PEERCRED``: pid, uid, primary gid; ``SO_PEERGROUPS``: supplementary
groups, both as they were at ``connect()``). The policy decides from those
alone; nothing here touches a socket or the clock, so every rule is unit-tested
with plain values.

Seven actions are controlled:

* ``connect``: may talk to the daemon at all (``hello``, ``device.info``,
  ``unsubscribe``, ``unmask``, ``unclaim`` need nothing more: they show the
  device or only undo what the client itself did);
* ``subscribe``: receive ``irq`` notifications for a vector;
* ``claim``: take a vector's eventfd for oneself (``claim``);
* ``trigger``: make interrupts happen (``trigger``; ``sim.eventfds`` on the
  simulated device, which hands out writable eventfds);
* ``stats``: read every client's pid, uid, name and subscriptions;
* ``drive``: get the VFIO device fd (``device.open``: BARs, config space, and
  anything else the kernel lets the device's owner do) and reset the device
  (``device.reset``). ``device.regions`` only needs ``connect``;
* ``dma``: get DMA memory mapped in the device's IOMMU (``dma.alloc``,
  ``dma.free``).

The default, ``AccessPolicy()``, lets root and members of the socket's group
connect (the group that owns the socket file, which is how a packaged service
grants access: ``SocketGroup=`` or a setgid run directory) and lets anyone who
may connect do everything else, except ``drive`` and ``dma``: a holder of the
device fd can do anything with the device, and DMA memory is pinned host
memory, so both default to root and the daemon's own uid. ``from_mapping`` builds a policy from the
``[access]`` table of the config file; docs/security.md has the schema.
"""

from __future__ import annotations

import enum
import grp
import os
import pwd
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from irqd.errors import ConfigError

__all__ = [
    "ANYONE",
    "ROOT_AND_SOCKET_GROUP",
    "AccessPolicy",
    "AccessPolicyError",
    "Action",
    "Principals",
    "VectorRule",
    "root_and_self",
]

#: IRQ index names on the wire (irqproto.methods.INDEX_NAMES), repeated here so
#: that the policy depends on nothing but the standard library and errors.
_INDEX_NAMES = ("intx", "msi", "msix", "err", "req")
_MAX_VECTOR = 2047


class Action(enum.StrEnum):
    """What a client may be allowed to do."""

    CONNECT = "connect"
    SUBSCRIBE = "subscribe"
    CLAIM = "claim"
    TRIGGER = "trigger"
    STATS = "stats"
    DRIVE = "drive"
    DMA = "dma"


#: Actions that name a vector, and so may be narrowed per vector.
VECTOR_ACTIONS = frozenset({Action.SUBSCRIBE, Action.CLAIM, Action.TRIGGER})


class Identity(Protocol):
    """What the policy reads of a peer (``irqd.hotpath.session.PeerCredentials`` has it)."""

    @property
    def uid(self) -> int:
        """Effective uid at connect time."""

    @property
    def gid(self) -> int:
        """Effective (primary) gid at connect time."""

    @property
    def groups(self) -> frozenset[int]:
        """Supplementary gids at connect time."""


class AccessPolicyError(ConfigError, ValueError):
    """The ``[access]`` table is wrong; ``key`` names the offending entry.

    A ``ValueError`` too, so that config loaders that catch those report it.

    ``key`` is a dotted path as in the config file, e.g. ``access.connect[1]``
    or ``access.vectors[0].index``; the message starts with it.
    """

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key
        self.detail = detail


@dataclass(frozen=True)
class Principals:
    """A set of peers: by uid, by group (primary or supplementary), or everyone.

    ``socket_group`` stands for the gid that owns the socket file, known only
    once the daemon listens; ``anyone`` is every peer that got this far (for
    any action but ``connect``, every peer allowed to connect).
    """

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    socket_group: bool = False
    anyone: bool = False

    def matches(self, peer: Identity, socket_gid: int | None) -> bool:
        """Whether ``peer`` is one of these principals."""
        if self.anyone or peer.uid in self.uids:
            return True
        groups = peer.groups | {peer.gid}
        if self.socket_group and socket_gid is not None and socket_gid in groups:
            return True
        return not self.gids.isdisjoint(groups)

    def describe(self) -> str:
        """The principals as they are written in the config file."""
        if self.anyone:
            return "any"
        parts = [f"uid:{uid}" for uid in sorted(self.uids)]
        parts += [f"gid:{gid}" for gid in sorted(self.gids)]
        if self.socket_group:
            parts.append("socket-group")
        return ", ".join(parts) or "nobody"


#: Everyone who got past ``connect``.
ANYONE = Principals(anyone=True)
#: The default for ``connect``: root and the group owning the socket.
ROOT_AND_SOCKET_GROUP = Principals(uids=frozenset({0}), socket_group=True)


def root_and_self() -> Principals:
    """The default for ``drive`` and ``dma``: root and the uid the daemon runs as."""
    return Principals(uids=frozenset({0, os.geteuid()}))


@dataclass(frozen=True)
class VectorRule:
    """A narrower rule for some vectors of one index.

    For every action it names, a peer must match both the policy's own entry
    and this rule's; actions it does not name are not narrowed.
    """

    index: str
    #: ``None``: every vector of the index.
    vectors: frozenset[int] | None
    #: Sorted ``(action, principals)`` pairs; a tuple so that the rule is hashable.
    permissions: tuple[tuple[Action, Principals], ...]

    def covers(self, index: str, vector: int) -> bool:
        """Whether this rule applies to ``index`` ``vector``."""
        return index == self.index and (self.vectors is None or vector in self.vectors)

    def principals(self, action: Action) -> Principals | None:
        """Who this rule lets do ``action``; ``None`` if it does not narrow it."""
        for name, principals in self.permissions:
            if name is action:
                return principals
        return None


@dataclass(frozen=True)
class AccessPolicy:
    """Who may connect and do each action (module docstring; docs/security.md)."""

    connect: Principals = ROOT_AND_SOCKET_GROUP
    subscribe: Principals = ANYONE
    claim: Principals = ANYONE
    trigger: Principals = ANYONE
    stats: Principals = ANYONE
    drive: Principals = field(default_factory=root_and_self)
    dma: Principals = field(default_factory=root_and_self)
    rules: tuple[VectorRule, ...] = field(default=())

    def denial(
        self,
        action: Action,
        peer: Identity,
        *,
        socket_gid: int | None,
        index: str | None = None,
        vector: int | None = None,
    ) -> str | None:
        """Why ``peer`` may not do ``action`` (on ``index`` ``vector``), or ``None``.

        ``socket_gid`` is the group owning the socket file (``None`` if unknown:
        then ``socket-group`` matches nobody). The reason is human text for the
        client's ``EACCES`` and the log.
        """
        who = f"uid {peer.uid}"
        if not getattr(self, action.value).matches(peer, socket_gid):
            return f"{who} may not {_verb(action)} (allowed: {self._describe(action)})"
        if action is Action.CONNECT or index is None or vector is None:
            return None
        for rule in self.rules:
            principals = rule.principals(action)
            if principals is None or not rule.covers(index, vector):
                continue
            if not principals.matches(peer, socket_gid):
                return (
                    f"{who} may not {_verb(action)} {index} vector {vector} "
                    f"(allowed: {principals.describe()})"
                )
        return None

    def allows(
        self,
        action: Action,
        peer: Identity,
        *,
        socket_gid: int | None,
        index: str | None = None,
        vector: int | None = None,
    ) -> bool:
        """Whether ``peer`` may do ``action``; see :meth:`denial`."""
        reason = self.denial(action, peer, socket_gid=socket_gid, index=index, vector=vector)
        return reason is None

    def _describe(self, action: Action) -> str:
        principals: Principals = getattr(self, action.value)
        if principals.anyone and action is not Action.CONNECT:
            return "anyone who may connect"
        return principals.describe()

    @classmethod
    def from_mapping(
        cls,
        mapping: Mapping[str, Any],
        *,
        user_id: Callable[[str], int] | None = None,
        group_id: Callable[[str], int] | None = None,
    ) -> AccessPolicy:
        """Build a policy from the config file's ``[access]`` table.

        Raises :class:`AccessPolicyError` naming the key for anything it cannot
        use: an unknown key (a typo in a security setting must not be
        ignored), a wrong type, an unknown user or group, a vector out of
        range. ``user_id``/``group_id`` resolve names (default: the system's
        passwd and group databases), so tests need no real accounts.
        """
        resolve = _Resolver(user_id or _system_user_id, group_id or _system_group_id)
        if not isinstance(mapping, Mapping):
            raise AccessPolicyError("access", f"expected a table, got {_kind(mapping)}")
        known = {action.value for action in Action} | {"vectors"}
        for key in mapping:
            if key not in known:
                raise AccessPolicyError(
                    f"access.{key}", f"unknown key; expected one of {sorted(known)}"
                )
        defaults = cls()
        values: dict[str, Principals] = {}
        for action in Action:
            raw = mapping.get(action.value)
            if raw is None:
                values[action.value] = getattr(defaults, action.value)
            else:
                values[action.value] = resolve.principals(raw, f"access.{action.value}")
        rules = tuple(
            _rule(entry, f"access.vectors[{i}]", resolve)
            for i, entry in enumerate(_list(mapping.get("vectors", []), "access.vectors"))
        )
        return cls(rules=rules, **values)


def _verb(action: Action) -> str:
    return {
        Action.CONNECT: "connect to this daemon",
        Action.SUBSCRIBE: "subscribe to",
        Action.CLAIM: "claim",
        Action.TRIGGER: "trigger",
        Action.STATS: "read stats",
        Action.DRIVE: "drive the device (device.open, device.reset)",
        Action.DMA: "allocate DMA memory",
    }[action]


# -- from_mapping helpers --------------------------------------------------------------


def _system_user_id(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _system_group_id(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _kind(value: object) -> str:
    return type(value).__name__


def _list(value: object, key: str) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise AccessPolicyError(key, f"expected an array, got {_kind(value)}")
    return value


@dataclass(frozen=True)
class _Resolver:
    user_id: Callable[[str], int]
    group_id: Callable[[str], int]

    def principals(self, raw: object, key: str) -> Principals:
        uids: set[int] = set()
        gids: set[int] = set()
        socket_group = anyone = False
        for i, item in enumerate(_list(raw, key)):
            where = f"{key}[{i}]"
            if not isinstance(item, str):
                raise AccessPolicyError(where, f"expected a string, got {_kind(item)}")
            if item == "any":
                anyone = True
            elif item == "socket-group":
                socket_group = True
            elif item == "root":
                uids.add(0)
            else:
                kind, sep, value = item.partition(":")
                if not sep or not value:
                    raise AccessPolicyError(where, _PRINCIPAL_HELP.format(item=item))
                if kind == "uid":
                    uids.add(_number(value, where))
                elif kind == "gid":
                    gids.add(_number(value, where))
                elif kind == "user":
                    uids.add(self._lookup(self.user_id, value, "user", where))
                elif kind == "group":
                    gids.add(self._lookup(self.group_id, value, "group", where))
                else:
                    raise AccessPolicyError(where, _PRINCIPAL_HELP.format(item=item))
        return Principals(frozenset(uids), frozenset(gids), socket_group, anyone)

    @staticmethod
    def _lookup(resolve: Callable[[str], int], name: str, kind: str, where: str) -> int:
        try:
            return resolve(name)
        except KeyError:
            raise AccessPolicyError(where, f"no such {kind} {name!r}") from None


_PRINCIPAL_HELP = (
    "{item!r} is not a principal; use 'any', 'root', 'socket-group', 'uid:N', "
    "'gid:N', 'user:NAME' or 'group:NAME'"
)


def _number(text: str, where: str) -> int:
    if not text.isdigit() or int(text) > 2**32 - 2:
        raise AccessPolicyError(where, f"{text!r} is not a uid/gid number")
    return int(text)


def _rule(entry: object, key: str, resolve: _Resolver) -> VectorRule:
    if not isinstance(entry, Mapping):
        raise AccessPolicyError(key, f"expected a table, got {_kind(entry)}")
    known = {"index", "vectors"} | {a.value for a in VECTOR_ACTIONS}
    for name in entry:
        if name not in known:
            per_device = {"connect", "stats", "drive", "dma"}
            hint = f" ({name} is not per vector)" if name in per_device else ""
            raise AccessPolicyError(
                f"{key}.{name}", f"unknown key{hint}; expected one of {sorted(known)}"
            )
    index = entry.get("index")
    if index not in _INDEX_NAMES:
        raise AccessPolicyError(
            f"{key}.index", f"expected one of {list(_INDEX_NAMES)}, got {index!r:.40}"
        )
    vectors: frozenset[int] | None = None
    if "vectors" in entry:
        numbers: list[int] = []
        for i, number in enumerate(_list(entry["vectors"], f"{key}.vectors")):
            if type(number) is not int or not 0 <= number <= _MAX_VECTOR:
                raise AccessPolicyError(
                    f"{key}.vectors[{i}]", f"expected a vector 0..{_MAX_VECTOR}, got {number!r:.40}"
                )
            numbers.append(number)
        vectors = frozenset(numbers)
    permissions = sorted(
        (
            (action, resolve.principals(entry[action.value], f"{key}.{action.value}"))
            for action in VECTOR_ACTIONS
            if action.value in entry
        ),
        key=lambda pair: pair[0].value,
    )
    if not permissions:
        raise AccessPolicyError(key, "names no action: give subscribe, claim or trigger")
    return VectorRule(index, vectors, tuple(permissions))
