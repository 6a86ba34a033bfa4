"""Single-flight: identical requests in flight at once, on any router replica, run once.

Why: the cache only helps once an answer is stored, so identical requests that arrive
together (a popular prompt, a retry storm, a fan-out) all ran on the backend. Now the first
lookup of a key that misses takes a lease on it (LEAD); identical lookups while the lease
is held FOLLOW the leader and receive its answer, text included as it is generated.

Everything is in Redis, so it holds across router and cache replicas:

- `shepherd:cache:lease:<key>` holds the leader's token, with an expiry (`lease_ms`, renewed
  by the leader while it works). Taking it is part of the lookup's one script: no added
  round trip on a miss.
- `shepherd:cache:flight:<key>:<token>` is a Redis stream of the leader's events: pieces of
  text (Publish), then one `done` with the whole completion (Store) or one `end` with the
  leader's error (Abandon). A stream, not pub/sub, because a late follower must get what was
  already produced and then the rest, and a stream is read from its start; not keyspace
  notifications, which are off by default and carry no payload. Keyed by the token, so a
  follower of an expired leader never mistakes a new leader's stream for its own.

In each cache process, one reader task per flight (a `Flight`) blocks on the stream and fans
its events out to every local follower, so a thousand followers of one key hold one Redis
connection, not a thousand. When the stream stays quiet, the reader checks the lease: gone
(the leader's router died) means the followers take over with a new lookup.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import redis.asyncio as redis
from redis.exceptions import RedisError
from shepherd.cache.v1 import cache_pb2
from shepherd.common.v1 import common_pb2

from libs.tasks import log_failure
from services.cache.keys import KEY_PREFIX

_log = logging.getLogger(__name__)
# How long a flight's stream is kept after its last event, for followers still reading it.
STREAM_TTL_MS = 60_000
# How long a reader blocks on a quiet stream before it checks that the lease is still held.
_QUIET_MS = 200

# KEYS: entry, lease. ARGV: token, lease ms, "1" to take a lease on a miss.
_LOOKUP = """
local v = redis.call('GET', KEYS[1])
if v then return {'hit', v} end
if ARGV[3] ~= '1' then return {'miss'} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'lead'} end
local holder = redis.call('GET', KEYS[2])
if not holder then return {'miss'} end
return {'follow', holder}
"""

# KEYS: entry, lease, flight. ARGV: token, completion bytes, ttl s (0: not kept), stream ttl ms.
_FINISH = """
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[3], '*', 'done', ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: lease, flight. ARGV: token, code, message, stream ttl ms.
_ABANDON = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], '*', 'end', ARGV[2], 'message', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: lease. ARGV: token, lease ms.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lease, flight. ARGV: token, text, stream ttl ms.
_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], '*', 'text', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""


def lease_key(key: str) -> str:
    return f"shepherd:cache:lease:{key[len(KEY_PREFIX) + 1 :]}"


def flight_key(key: str, token: str) -> str:
    return f"shepherd:cache:flight:{key[len(KEY_PREFIX) + 1 :]}:{token}"


@dataclass(frozen=True)
class Found:
    """What a lookup found: `kind` is hit, miss, lead or follow."""

    kind: str
    completion: common_pb2.Completion | None = None
    token: str = ""  # the lease's: ours when leading, the leader's when following


class Flights:
    """Leases, flight streams and the local fan-out of their events."""

    def __init__(
        self, client: redis.Redis, blocking: redis.Redis, lease_ms: int, enabled: bool = True
    ) -> None:
        self._client = client
        self.enabled = enabled
        self.blocking = blocking  # its own pool: readers hold a connection while they wait
        self.lease_ms = lease_ms
        self._lookup = client.register_script(_LOOKUP)
        self._finish = client.register_script(_FINISH)
        self._abandon = client.register_script(_ABANDON)
        self._renew = client.register_script(_RENEW)
        self._publish = client.register_script(_PUBLISH)
        self._flights: dict[str, Flight] = {}
        self.expired = 0  # leases whose leader vanished, seen by this process's readers

    async def lookup(self, key: str, lead: bool) -> Found:
        """The stored answer, or a lease (lead), or the leader to follow; raises RedisError."""
        token = secrets.token_hex(8)
        lead = lead and self.enabled
        result = await self._lookup(
            keys=[key, lease_key(key)], args=[token, self.lease_ms, "1" if lead else "0"]
        )
        kind = result[0].decode()
        if kind == "hit":
            return Found("hit", completion=common_pb2.Completion.FromString(result[1]))
        if kind == "lead":
            return Found("lead", token=token)
        if kind == "follow":
            return Found("follow", token=result[1].decode())
        return Found("miss")

    async def finish(
        self, key: str, token: str, completion: common_pb2.Completion, ttl_s: int
    ) -> bool:
        """Store the answer (unless ttl_s is 0) and hand it to the followers."""
        data = completion.SerializeToString()
        return bool(
            await self._finish(
                keys=[key, lease_key(key), flight_key(key, token)],
                args=[token, data, ttl_s, STREAM_TTL_MS],
            )
        )

    async def abandon(self, key: str, token: str, code: int, message: str) -> bool:
        return bool(
            await self._abandon(
                keys=[lease_key(key), flight_key(key, token)],
                args=[token, code, message[:1000], STREAM_TTL_MS],
            )
        )

    async def renew(self, key: str, token: str) -> bool:
        return bool(await self._renew(keys=[lease_key(key)], args=[token, self.lease_ms]))

    async def publish(self, key: str, token: str, text: str) -> bool:
        return bool(
            await self._publish(
                keys=[lease_key(key), flight_key(key, token)], args=[token, text, STREAM_TTL_MS]
            )
        )

    async def follow(self, key: str, token: str) -> AsyncIterator[cache_pb2.FollowResponse]:
        """The leader's events, from its first; ends after its completion or its end."""
        stream = flight_key(key, token)
        flight = self._flights.get(stream)
        if flight is None or flight.finished:
            flight = Flight(self, stream, lease_key(key), token)
            self._flights[stream] = flight
            flight.start()
        flight.followers += 1
        try:
            index = 0
            while True:
                while index < len(flight.events):
                    event = flight.events[index]
                    index += 1
                    yield event
                    if not event.HasField("text"):
                        return
                if flight.finished:
                    return
                await flight.changed()
        finally:
            flight.followers -= 1
            if flight.followers == 0 and self._flights.get(stream) is flight:
                flight.stop()
                del self._flights[stream]

    async def close(self) -> None:
        for flight in list(self._flights.values()):
            flight.stop()
        self._flights.clear()


class Flight:
    """One leader's stream, read once per process and fanned out to local followers."""

    def __init__(self, owner: Flights, stream: str, lease: str, token: str) -> None:
        self._owner = owner
        self._stream = stream
        self._lease = lease
        self._token = token
        self.events: list[cache_pb2.FollowResponse] = []
        self.finished = False
        self.followers = 0
        self._signal = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read(), name=f"flight:{self._stream}")
        self._task.add_done_callback(log_failure)

    def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def changed(self) -> None:
        await self._signal.wait()

    def _emit(self, event: cache_pb2.FollowResponse) -> None:
        self.events.append(event)
        if not event.HasField("text"):
            self.finished = True
        signal, self._signal = self._signal, asyncio.Event()
        signal.set()

    async def _read(self) -> None:
        last = "0"
        client = self._owner.blocking
        try:
            while not self.finished:
                try:
                    reply = await client.xread({self._stream: last}, count=256, block=_QUIET_MS)
                    if not reply:
                        if await client.get(self._lease) != self._token.encode():
                            # Gone without a `done`: the leader died (or its lease lapsed).
                            # One more read, in case its last event landed just before.
                            reply = await client.xread({self._stream: last}, count=256)
                            if not reply:
                                self._owner.expired += 1
                                self._emit(
                                    cache_pb2.FollowResponse(
                                        end=cache_pb2.FollowEnd(lease_expired=True)
                                    )
                                )
                                return
                except RedisError as error:
                    # The cache fails open: the followers run the request themselves.
                    _log.warning("flight read failed open", extra={"error": str(error)})
                    self._emit(
                        cache_pb2.FollowResponse(end=cache_pb2.FollowEnd(lease_expired=True))
                    )
                    return
                # RESP2 replies: [[stream, [(id, fields), ...]]] (redis-py types every protocol).
                streams = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], reply)
                for _, entries in streams:
                    for entry_id, fields in entries:
                        last = entry_id.decode()
                        self._emit(_event(fields))
                        if self.finished:
                            return
        except asyncio.CancelledError:
            self.finished = True
            signal, self._signal = self._signal, asyncio.Event()
            signal.set()
            raise


def _event(fields: dict[bytes, bytes]) -> cache_pb2.FollowResponse:
    if b"text" in fields:
        return cache_pb2.FollowResponse(text=fields[b"text"].decode())
    if b"done" in fields:
        return cache_pb2.FollowResponse(
            completion=common_pb2.Completion.FromString(fields[b"done"])
        )
    return cache_pb2.FollowResponse(
        end=cache_pb2.FollowEnd(
            code=int(fields.get(b"end", b"2")), message=fields.get(b"message", b"").decode()
        )
    )
