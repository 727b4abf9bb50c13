"""The access policy as a pure function of credentials, and its config-file schema."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest

from irqd.limits import LimitsError, ServerLimits
from irqd.policy import (
    ANYONE,
    AccessPolicy,
    AccessPolicyError,
    Action,
    Principals,
)

SOCKET_GID = 990


@dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


ROOT = Peer(0, 0)
MEMBER = Peer(1000, 1000, frozenset({SOCKET_GID}))  # socket group as a supplementary group
PRIMARY = Peer(1001, SOCKET_GID)  # socket group as the primary group
STRANGER = Peer(65534, 65534)

USERS = {"dpdk": 1200, "mon": 1300}
GROUPS = {"netdev": 120, "vfio": SOCKET_GID}


def parse(mapping: dict[str, Any]) -> AccessPolicy:
    return AccessPolicy.from_mapping(
        mapping, user_id=USERS.__getitem__, group_id=GROUPS.__getitem__
    )


def allowed(policy: AccessPolicy, action: Action, peer: Peer, **where: Any) -> bool:
    return policy.allows(action, peer, socket_gid=SOCKET_GID, **where)


def test_default_lets_root_and_the_socket_group_in_and_nobody_else() -> None:
    policy = AccessPolicy()
    device_owner = {Action.DRIVE, Action.DMA}  # root and the daemon's uid only
    for peer in (ROOT, MEMBER, PRIMARY):
        for action in set(Action) - device_owner:
            assert allowed(policy, action, peer, index="msix", vector=3), (peer, action)
    for action in device_owner:
        assert allowed(policy, action, ROOT)
        assert allowed(policy, action, Peer(uid=os.geteuid(), gid=65534))
        assert not allowed(policy, action, MEMBER if os.geteuid() != MEMBER.uid else PRIMARY)
    assert not allowed(policy, Action.CONNECT, STRANGER)
    reason = policy.denial(Action.CONNECT, STRANGER, socket_gid=SOCKET_GID)
    assert reason is not None
    assert "uid 65534" in reason
    assert "socket-group" in reason


def test_socket_group_matches_nobody_when_it_is_unknown() -> None:
    assert not AccessPolicy().allows(Action.CONNECT, MEMBER, socket_gid=None)
    assert AccessPolicy().allows(Action.CONNECT, ROOT, socket_gid=None)


def test_empty_mapping_is_the_default() -> None:
    assert parse({}) == AccessPolicy()


def test_per_action_lists() -> None:
    policy = parse(
        {
            "connect": ["any"],
            "stats": ["root", "group:netdev"],
            "trigger": ["uid:0"],
            "claim": ["user:dpdk"],
        }
    )
    netdev = Peer(1500, 1500, frozenset({120}))
    dpdk = Peer(1200, 1200)
    assert allowed(policy, Action.CONNECT, STRANGER)
    assert allowed(policy, Action.SUBSCRIBE, STRANGER, index="msix", vector=0)
    assert allowed(policy, Action.STATS, netdev)
    assert not allowed(policy, Action.STATS, dpdk)
    assert allowed(policy, Action.TRIGGER, ROOT, index="msix", vector=0)
    assert not allowed(policy, Action.TRIGGER, dpdk, index="msix", vector=0)
    assert allowed(policy, Action.CLAIM, dpdk, index="msix", vector=0)
    assert not allowed(policy, Action.CLAIM, ROOT, index="msix", vector=0)


def test_vector_rules_narrow_only_what_they_cover() -> None:
    policy = parse(
        {
            "vectors": [
                {"index": "msix", "vectors": [0, 1], "subscribe": ["user:dpdk"]},
                {"index": "intx", "claim": ["user:mon"], "trigger": ["root"]},
            ]
        }
    )
    dpdk, mon = Peer(1200, 1200, frozenset({SOCKET_GID})), Peer(1300, SOCKET_GID)
    assert allowed(policy, Action.SUBSCRIBE, dpdk, index="msix", vector=1)
    assert not allowed(policy, Action.SUBSCRIBE, mon, index="msix", vector=1)
    assert allowed(policy, Action.SUBSCRIBE, mon, index="msix", vector=2)  # not covered
    assert allowed(policy, Action.CLAIM, mon, index="msix", vector=1)  # claim not narrowed
    assert allowed(policy, Action.CLAIM, mon, index="intx", vector=0)
    assert not allowed(policy, Action.CLAIM, dpdk, index="intx", vector=0)
    assert not allowed(policy, Action.TRIGGER, dpdk, index="intx", vector=0)
    reason = policy.denial(Action.SUBSCRIBE, mon, socket_gid=SOCKET_GID, index="msix", vector=0)
    assert reason == "uid 1300 may not subscribe to msix vector 0 (allowed: uid:1200)"


def test_a_rule_cannot_widen_the_global_list() -> None:
    policy = parse({"claim": ["root"], "vectors": [{"index": "msix", "claim": ["any"]}]})
    assert not allowed(policy, Action.CLAIM, MEMBER, index="msix", vector=0)


def test_the_policy_is_hashable_and_comparable() -> None:
    # Frozen all the way down: a config dataclass may hold it as a default.
    mapping = {"vectors": [{"index": "msix", "vectors": [3], "claim": ["root"]}]}
    assert hash(parse(mapping)) == hash(parse(mapping))
    assert parse(mapping) == parse(mapping)


def test_principals_describe_themselves_in_config_syntax() -> None:
    assert ANYONE.describe() == "any"
    assert Principals(frozenset({0, 5}), frozenset({7}), True).describe() == (
        "uid:0, uid:5, gid:7, socket-group"
    )
    assert Principals().describe() == "nobody"


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        ({"conect": ["any"]}, "access.conect"),
        ({"connect": "any"}, "access.connect"),
        ({"connect": ["any", 0]}, "access.connect[1]"),
        ({"stats": ["uid:x"]}, "access.stats[0]"),
        ({"stats": ["uid:-1"]}, "access.stats[0]"),
        ({"stats": ["uid:"]}, "access.stats[0]"),
        ({"stats": ["someone"]}, "access.stats[0]"),
        ({"claim": ["user:nosuch"]}, "access.claim[0]"),
        ({"claim": ["group:nosuch"]}, "access.claim[0]"),
        ({"vectors": {}}, "access.vectors"),
        ({"vectors": ["msix"]}, "access.vectors[0]"),
        ({"vectors": [{"index": "msx", "claim": []}]}, "access.vectors[0].index"),
        ({"vectors": [{"index": "msix"}]}, "access.vectors[0]"),
        ({"vectors": [{"index": "msix", "stats": []}]}, "access.vectors[0].stats"),
        ({"vectors": [{"index": "msix", "vectors": [2048], "claim": []}]}, None),
        ({"vectors": [{"index": "msix", "vectors": [True], "claim": []}]}, None),
        ({"vectors": [{"index": "msix", "claim": ["any"], "trigger": [1]}]}, None),
    ],
)
def test_bad_tables_name_the_key(mapping: dict[str, Any], key: str | None) -> None:
    with pytest.raises(AccessPolicyError) as info:
        parse(mapping)
    if key is None:
        key = info.value.key
        assert key.startswith("access.vectors[0].")
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    # Config loaders that catch ValueError report it too.
    assert isinstance(info.value, ValueError)


def test_names_resolve_through_the_system_databases_by_default() -> None:
    policy = AccessPolicy.from_mapping({"stats": ["user:root", "group:root"]})
    assert policy.stats == Principals(frozenset({0}), frozenset({0}))


def test_limits_from_mapping() -> None:
    limits = ServerLimits.from_mapping({"max_clients": 8, "max_message_size": 4096})
    assert limits.max_clients == 8
    assert limits.message.max_message_size == 4096
    assert ServerLimits.from_mapping({}) == ServerLimits()
    for bad, key in (
        ({"max_client": 8}, "limits.max_client"),
        ({"max_clients": 0}, "limits.max_clients"),
        ({"hello_timeout": -1}, "limits.hello_timeout"),
        ({"max_vectors_per_request": 4096}, "limits.max_vectors_per_request"),
        ({"max_depth": 0}, "limits.max_depth"),
    ):
        with pytest.raises(LimitsError) as info:
            ServerLimits.from_mapping(bad)
        assert info.value.key == key, bad
