"""Scheduler replicas in Redis: who is live, and which replica owns which model.

Shared by the scheduler (which registers and heartbeats) and the router (which reads the
members to send each request to its model's owner), so both compute ownership the same way.

Membership is one sorted set per scheduler cluster: replica id -> the Unix millisecond its
registration expires, renewed by every heartbeat; a hash beside it holds each replica's
advertised address. A replica that stops heartbeating (SIGKILL, a lost node) drops out when
its entry expires, with no coordinator: every reader filters by Redis's own clock (TIME in the
script), so replicas' clocks never matter.

Ownership is rendezvous (highest random weight) hashing: the owner of a model is the member
whose hash of (member, model) is highest. Every router and replica that reads the same
members computes the same owner with no further coordination, and when a member joins or
leaves only the models it wins or held move (1/n of them), never a reshuffle of the rest.

Every key shares the hash tag `{<cluster>}`, so on Redis Cluster each script touches one slot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import redis.asyncio as redis

from libs.server import text

CLUSTER_KEY_PREFIX = "shepherd:scheduler"
# Metadata a router adds when it retries a request because a replica did not answer: the
# replicas it could not reach. The next owner (by rendezvous over the rest) then takes the
# request although its own view still lists the unreachable owner as live.
UNREACHABLE_METADATA = "x-shepherd-unreachable-replicas"
# google.rpc.ErrorInfo reason of a replica's refusal of a model it does not own.
NOT_OWNER_REASON = "SCHEDULER_NOT_OWNER"
ERROR_DOMAIN = "shepherd.scheduler"


def replica_ids(value: str) -> list[str]:
    """The replica ids in a comma-separated list (UNREACHABLE_METADATA's value, and an
    InferMany call's `unreachable_replicas`)."""
    return [replica for replica in value.split(",") if replica]


def unreachable_in(metadata: Iterable[tuple[str, str | bytes]]) -> list[str]:
    """The replica ids a call's UNREACHABLE_METADATA names."""
    return [
        replica
        for key, value in metadata
        if key == UNREACHABLE_METADATA
        for replica in replica_ids(str(value))
    ]


def prefix(cluster: str) -> str:
    """All of one scheduler cluster's keys start with this (one hash slot)."""
    return f"{CLUSTER_KEY_PREFIX}:{{{cluster}}}"


def members_key(cluster: str) -> str:
    return f"{prefix(cluster)}:members"


def addresses_key(cluster: str) -> str:
    return f"{prefix(cluster)}:addresses"


def _weight(member: str, model: str) -> int:
    digest = hashlib.blake2b(f"{member}\0{model}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner_of(model: str, members: Iterable[str]) -> str | None:
    """The member that owns `model` by rendezvous hashing; None when there is none."""
    best: tuple[int, str] | None = None
    for member in members:
        candidate = (_weight(member, model), member)
        if best is None or candidate > best:
            best = candidate
    return None if best is None else best[1]


def assignments(models: Iterable[str], members: Iterable[str]) -> dict[str, str]:
    """Every model's owner among `members` (models map to nothing when there are none)."""
    live = list(members)
    result = {}
    for model in models:
        owner = owner_of(model, live)
        if owner is not None:
            result[model] = owner
    return result


# Live members and their addresses, by Redis's clock. Read-only: expired entries are removed
# by the heartbeat script, not here, so a router's read never writes.
_READ_MEMBERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
end
return out
"""


def pairs(reply: list[bytes | str]) -> dict[str, str]:
    """A flat [id, address, id, address, ...] script reply as a mapping."""
    return {text(reply[i]): text(reply[i + 1]) for i in range(0, len(reply) - 1, 2)}


class MemberReader:
    """Reads a scheduler cluster's live members (one script call, one round trip)."""

    def __init__(self, client: redis.Redis, cluster: str) -> None:
        self._keys = [members_key(cluster), addresses_key(cluster)]
        self._script = client.register_script(_READ_MEMBERS)

    async def read(self) -> dict[str, str]:
        """Live replica id -> advertised address."""
        reply = await self._script(keys=self._keys)
        return pairs(reply)


def describe(members: Mapping[str, str], replica: str) -> str:
    """A replica as an operator would look for it: its id and address."""
    address = members.get(replica, "")
    return f"{replica} ({address})" if address else replica
