"""Scale-out: many scheduler replicas with one view of queues, node capacity and placement.

Off by default (`SHEPHERD_SCHEDULER_CLUSTER` empty): one replica owns everything, in memory,
and nothing here runs. On, every piece of shared state lives in Redis under the cluster's
hash tag (libs/membership.py), with these rules (docs/ARCHITECTURE.md, *Scale-out*):

* Membership: each replica heartbeats its entry (expiry `member_ttl_s`) and its advertised
  address every `heartbeat_s`; the same script drops expired entries and returns the live
  members, so one round trip a heartbeat is the whole protocol.
* Queues: a model's queue is held by its owner, the member that wins rendezvous hashing
  (libs/membership.owner_of). The router sends each request there; a replica refuses a model
  it does not own (UNAVAILABLE, naming the owner), so priority, deadline order, fair shares and
  batching are global per model.
* Node capacity: a node's in-flight cap is a semaphore in Redis: one hash of holders per node,
  each naming its replica and the models its batch uses. One script per batch takes a slot
  (holders of replicas no longer live are dropped on the way, so a dead replica's slots come
  back when its membership expires) and one HDEL gives it back.
* Placement: one writer per pool, the holder of the pool's leader lease (renewed with the
  heartbeat). Other replicas ask it (SchedulerService/EnsureLoaded). Before it unloads a model
  it marks the model "unloading" on that node in the same script that checks no live holder
  uses it, and the slot script refuses a batch of a marked model: no batch of a model starts
  on a node while, or after, it is unloaded there, until the leader loads it again. A new
  leader adopts what the nodes report loaded and never unloads on takeover.
* Requests: before a batch runs, its requests are claimed by (tenant, request id) in one
  script; a request that a live replica is already running is not run again (a router's retry
  after an owner it could not reach).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import redis.asyncio as redis
from shepherd.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from libs.credentials import Credentials
from libs.errors import ShepherdError, from_rpc_error
from libs.health import Verdict
from libs.membership import (
    MemberReader,
    addresses_key,
    assignments,
    members_key,
    owner_of,
    pairs,
    prefix,
)
from libs.peers import PeerChannel, open_channel
from libs.server import text
from libs.tasks import supervise

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    """Scale-out settings; read once at start-up (services/scheduler/config.py)."""

    # The cluster's name and Redis's hash tag; empty: a single replica, no Redis at all.
    name: str = ""
    redis_url: str = ""
    # This replica's id (unique per process) and the address others dial it on.
    replica_id: str = ""
    advertise: str = ""
    heartbeat_s: float = 0.5
    # A replica whose heartbeat stops is dropped after this; its models move then.
    member_ttl_s: float = 2.5
    # The placement lease; renewed with every heartbeat.
    leader_ttl_s: float = 2.5
    # How long an "unloading" mark outlives the unload, unless the model is loaded again.
    unload_mark_s: float = 120.0
    # A batch refused a slot because other replicas fill the node retries after this.
    full_retry_s: float = 0.01

    @property
    def enabled(self) -> bool:
        return bool(self.name)


def default_replica_id() -> str:
    """host-pid-random: unique per process, readable in logs and GetAssignments."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _now_ms_lua() -> str:
    return (
        "local t = redis.call('TIME')\n"
        "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    )


# KEYS: members, addresses, then one leader key per pool. ARGV: id, address, member ttl ms,
# leader ttl ms, "1" when this replica may lead. Returns {members flat, leaders}.
_HEARTBEAT = (
    _now_ms_lua()
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
for _, id in ipairs(dead) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
local members = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  members[#members + 1] = id
  members[#members + 1] = redis.call('HGET', KEYS[2], id) or ''
end
local leaders = {}
for i = 3, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[1] then
    if ARGV[5] == '1' then
      redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[4]))
    else
      redis.call('DEL', KEYS[i])
      holder = false
    end
  elseif ARGV[5] == '1' then
    local alive = holder and redis.call('ZSCORE', KEYS[1], holder)
    if not alive or tonumber(alive) < now then
      redis.call('SET', KEYS[i], ARGV[1], 'PX', tonumber(ARGV[4]))
      holder = ARGV[1]
    end
  end
  leaders[#leaders + 1] = holder or ''
end
return {members, leaders}
"""
)

# Holders of live replicas that use one of `models`, after dropping those of dead replicas.
_LIVE_HOLDERS = """
local function live_holders(holders_key, members_key, now)
  local all = redis.call('HGETALL', holders_key)
  local live = {}
  for i = 1, #all, 2 do
    local value = all[i + 1]
    local sep = string.find(value, '|', 1, true)
    local replica = string.sub(value, 1, sep - 1)
    local score = redis.call('ZSCORE', members_key, replica)
    if not score or tonumber(score) < now then
      redis.call('HDEL', holders_key, all[i])
    else
      live[#live + 1] = ',' .. string.sub(value, sep + 1) .. ','
    end
  end
  return live
end
"""

# KEYS: node holders, members, node marks. ARGV: cap, holder id, replica, models (comma list).
# Returns {1, n} granted; {0, n} the node is full; {-1, model} a model is being unloaded there.
_ACQUIRE = (
    _now_ms_lua()
    + _LIVE_HOLDERS
    + """
for model in string.gmatch(ARGV[4], '[^,]+') do
  local mark = redis.call('HGET', KEYS[3], model)
  if mark and tonumber(mark) > now then
    return {-1, model}
  end
end
local live = live_holders(KEYS[1], KEYS[2], now)
if #live >= tonumber(ARGV[1]) then
  return {0, #live}
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3] .. '|' .. ARGV[4])
return {1, #live + 1}
"""
)

# KEYS: node holders, members, node marks. ARGV: model, mark ttl ms. 1: marked (no live batch
# uses the model on the node, and none can start); 0: a live batch uses it.
_MARK_UNLOADING = (
    _now_ms_lua()
    + _LIVE_HOLDERS
    + """
local needle = ',' .. ARGV[1] .. ','
for _, models in ipairs(live_holders(KEYS[1], KEYS[2], now)) do
  if string.find(models, needle, 1, true) then
    return 0
  end
end
redis.call('HSET', KEYS[3], ARGV[1], now + tonumber(ARGV[2]))
return 1
"""
)

# KEYS: members, then one claim key per request. ARGV: replica, ttl ms, then replicas a
# router could not reach (treated as dead). Returns the 1-based indices refused: claimed by
# another live replica.
_CLAIM = (
    _now_ms_lua()
    + """
local unreachable = {}
for i = 3, #ARGV do unreachable[ARGV[i]] = true end
local refused = {}
for i = 2, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  local taken = false
  if holder and holder ~= ARGV[1] and not unreachable[holder] then
    local score = redis.call('ZSCORE', KEYS[1], holder)
    taken = score and tonumber(score) >= now
  end
  if taken then
    refused[#refused + 1] = i - 1
  else
    redis.call('SET', KEYS[i], ARGV[1], 'PX', tonumber(ARGV[2]))
  end
end
return refused
"""
)


class Cluster:
    """This replica's membership, view of the others, leases and shared capacity in Redis."""

    def __init__(
        self,
        config: ClusterConfig,
        client: redis.Redis,
        models: Iterable[str],
        pools: Iterable[str],
    ) -> None:
        self.config = config
        self.replica_id = config.replica_id
        self._redis = client
        self._models = sorted(models)
        self._pools = sorted(pools)
        self._prefix = prefix(config.name)
        self._members_key = members_key(config.name)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._acquire = client.register_script(_ACQUIRE)
        self._mark = client.register_script(_MARK_UNLOADING)
        self._claim = client.register_script(_CLAIM)
        self._reader = MemberReader(client, config.name)
        self.members: dict[str, str] = {}
        self.leaders: dict[str, str] = {}
        self.owners: dict[str, str] = {}
        self._renewed_at = -float("inf")
        self._read_at = -float("inf")
        self._seq = itertools.count()
        self._leading = True  # false while shutting down: give the leases away
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[object]] = set()
        # Called with a pool's name when this replica becomes its placement leader.
        self.on_leadership: Callable[[str], None] = lambda _pool: None

    # -- keys -------------------------------------------------------------------------------

    def leader_key(self, pool: str) -> str:
        return f"{self._prefix}:pool:{pool}:leader"

    def _node_keys(self, pool: str, node: str) -> list[str]:
        base = f"{self._prefix}:pool:{pool}:node:{node}"
        return [f"{base}:holders", self._members_key, f"{base}:marks"]

    def claim_key(self, tenant: str, request_id: str) -> str:
        return f"{self._prefix}:claim:{tenant}:{request_id}"

    # -- membership -------------------------------------------------------------------------

    async def start(self) -> None:
        """Register (so this replica is a member before it serves), then keep heartbeating."""
        await self.beat()
        self._task = supervise("scheduler-membership", self._loop)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            try:
                await self.beat()
            except redis.RedisError as error:
                _log.warning("scheduler heartbeat failed", extra={"error": str(error)})

    async def beat(self) -> None:
        """One heartbeat: renew membership and leases, learn the members and leaders."""
        started = time.monotonic()
        reply = await self._heartbeat(
            keys=[
                self._members_key,
                addresses_key(self.config.name),
                *(self.leader_key(p) for p in self._pools),
            ],
            args=[
                self.replica_id,
                self.config.advertise,
                int(self.config.member_ttl_s * 1000),
                int(self.config.leader_ttl_s * 1000),
                "1" if self._leading else "0",
            ],
        )
        self._renewed_at = started
        self._learn(pairs(reply[0]))
        leaders = {pool: text(holder) for pool, holder in zip(self._pools, reply[1], strict=True)}
        gained = [
            pool
            for pool, holder in leaders.items()
            if holder == self.replica_id and self.leaders.get(pool) != self.replica_id
        ]
        self.leaders = leaders
        for pool in gained:
            _log.info("placement leadership taken", extra={"pool": pool})
            self.on_leadership(pool)

    def _learn(self, members: dict[str, str]) -> None:
        if members != self.members:
            joined = sorted(set(members) - set(self.members))
            left = sorted(set(self.members) - set(members))
            self.members = members
            self.owners = assignments(self._models, members)
            _log.info(
                "scheduler members changed",
                extra={"members": sorted(members), "joined": joined, "left": left},
            )

    async def refresh(self) -> None:
        """Read the members now (the rare path: a request this replica thinks it does not own),
        at most every 0.1 s however many such requests arrive."""
        now = time.monotonic()
        if now - self._read_at < 0.1:
            return
        self._read_at = now
        self._learn(await self._reader.read())

    @property
    def registered(self) -> bool:
        """Whether this replica's membership is current (renewed within its expiry)."""
        return time.monotonic() - self._renewed_at < self.config.member_ttl_s

    def owner(self, model: str, unreachable: frozenset[str] = frozenset()) -> str | None:
        if not unreachable:
            owner = self.owners.get(model)
            if owner is not None:
                return owner
        return owner_of(model, (m for m in self.members if m not in unreachable))

    def owns(self, model: str, unreachable: frozenset[str] = frozenset()) -> bool:
        return self.owner(model, unreachable) == self.replica_id

    def leads(self, pool: str) -> bool:
        """Whether this replica may load and unload on `pool` now: it holds the lease, and
        renewed it recently enough that no other replica can have taken it since."""
        return (
            self.leaders.get(pool) == self.replica_id
            and time.monotonic() - self._renewed_at < self.config.leader_ttl_s * 0.6
        )

    def leader_address(self, pool: str) -> str:
        leader = self.leaders.get(pool, "")
        return self.members.get(leader, "") if leader else ""

    async def close(self) -> None:
        """Leave: give up the leases and the membership, so others take over at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        self._leading = False
        with contextlib.suppress(redis.RedisError):
            await self.beat()  # releases the leases this replica holds
            await self._redis.zrem(self._members_key, self.replica_id)
            await self._redis.hdel(addresses_key(self.config.name), self.replica_id)

    # -- node capacity ----------------------------------------------------------------------

    def holder_id(self) -> str:
        return f"{self.replica_id}:{next(self._seq)}"

    async def acquire_slot(
        self, pool: str, node: str, cap: int, holder: str, models: Sequence[str]
    ) -> tuple[int, str]:
        """Take one of the node's `cap` slots for a batch using `models`.

        (1, "") granted; (0, "") the node is full across replicas; (-1, model) `model` is
        being (or was) unloaded there: forget it on that node.
        """
        reply = await self._acquire(
            keys=self._node_keys(pool, node),
            args=[cap, holder, self.replica_id, ",".join(models)],
        )
        verdict = int(reply[0])
        return verdict, (text(reply[1]) if verdict < 0 else "")

    def release_slot(self, pool: str, node: str, holder: str, done: Callable[[], None]) -> None:
        """Give a slot back (fire and forget, tracked so shutdown waits for it); `done` runs
        when Redis has it, so this replica's next grant on the node is not refused by its own
        stale holder."""
        self._spawn(self._release(pool, node, holder, done))

    async def _release(self, pool: str, node: str, holder: str, done: Callable[[], None]) -> None:
        try:
            for attempt in range(3):
                try:
                    await self._redis.hdel(self._node_keys(pool, node)[0], holder)
                    return
                except redis.RedisError as error:
                    if attempt == 2:
                        # The holder stays until this replica's membership ends: the slot is
                        # lost meanwhile, never double-granted.
                        _log.warning(
                            "node slot release failed", extra={"node": node, "error": str(error)}
                        )
                    await asyncio.sleep(0.05)
        finally:
            done()

    async def mark_unloading(self, pool: str, node: str, model: str) -> bool:
        """Atomically: no live batch uses `model` on `node`, and none may start there."""
        reply = await self._mark(
            keys=self._node_keys(pool, node),
            args=[model, int(self.config.unload_mark_s * 1000)],
        )
        return int(reply) == 1

    async def loaded(self, pool: str, node: str, models: Sequence[str]) -> None:
        """`models` are loaded on `node` again: batches of them may start there."""
        if models:
            await self._redis.hdel(self._node_keys(pool, node)[2], *models)

    # -- requests ---------------------------------------------------------------------------

    async def claim(
        self,
        requests: Sequence[tuple[str, str]],
        ttl_s: float,
        unreachable: Iterable[str] = (),
    ) -> set[int]:
        """Claim (tenant, request id) pairs for this replica; the indices another live replica
        already runs. Requests without an id are never refused."""
        indexed = [(i, t, r) for i, (t, r) in enumerate(requests) if r]
        if not indexed:
            return set()
        refused = await self._claim(
            keys=[self._members_key, *(self.claim_key(t, r) for _, t, r in indexed)],
            args=[self.replica_id, max(1, int(ttl_s * 1000)), *sorted(set(unreachable))],
        )
        return {indexed[int(n) - 1][0] for n in refused}

    def unclaim(self, requests: Iterable[tuple[str, str]]) -> None:
        keys = [self.claim_key(t, r) for t, r in requests if r]
        if keys:
            self._spawn(self._unclaim(keys))

    async def _unclaim(self, keys: list[str]) -> None:
        with contextlib.suppress(redis.RedisError):
            await self._redis.delete(*keys)

    def _spawn(self, coroutine: object) -> None:
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(coroutine)  # type: ignore[arg-type]
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # -- reporting --------------------------------------------------------------------------

    def snapshot(self) -> tuple[Mapping[str, str], Mapping[str, str], Mapping[str, str]]:
        """Members (id -> address), model -> owner, pool -> leader."""
        return dict(self.members), dict(self.owners), dict(self.leaders)


class MembershipProbe:
    """Ready only while this replica is a registered member that knows its assignment."""

    name = "membership"

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    async def check(self) -> Verdict:
        ok = self._cluster.registered and self._cluster.replica_id in self._cluster.members
        return Verdict(ok, "not registered in the scheduler membership (Redis)", {})

    async def close(self) -> None:
        """Nothing to close: the cluster is closed with the scheduler."""


class LeaderClient:
    """Asks a pool's placement leader (another replica) to load a model: EnsureLoaded."""

    def __init__(self, cluster: Cluster, credentials: Credentials, timeout_s: float) -> None:
        self._cluster = cluster
        self._credentials = credentials
        self._timeout_s = timeout_s
        self._channels: dict[str, PeerChannel] = {}

    async def ensure_loaded(self, pool: str, backend_model: str) -> list[str]:
        """The nodes that hold the model once the leader has it loaded (UNAVAILABLE if not)."""
        address = self._cluster.leader_address(pool)
        if not address:
            raise ShepherdError(
                grpc.StatusCode.UNAVAILABLE, f"pool {pool!r} has no placement leader right now"
            )
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self._credentials)
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        try:
            reply = await stub.EnsureLoaded(
                scheduler_pb2.EnsureLoadedRequest(pool=pool, backend_model=backend_model),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, "placement leader") from error
        return list(reply.nodes)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
