"""Which scheduler replica gets a request: the one that owns its model's queue.

Without a scheduler cluster (`SHEPHERD_SCHEDULER_CLUSTER` empty) there is one scheduler
address (`SHEPHERD_SCHEDULER_ADDR`, a Kubernetes Service or one process) and nothing here
reads Redis. With one, the router reads the cluster's live members from Redis every
`poll_s` (libs/membership.py), keeps one channel per member (opened when it appears, closed
when it leaves) and sends each request to its model's owner by rendezvous hashing, the same
computation every replica makes. The configured address stays the fallback while Redis
lists no member.

A request that failed before any text may be sent once more (the pipeline decides, with its
deadline):

* the replica refused it as not its owner (its view of the members moved first): the
  members are read again and the request goes to the owner they name;
* the replica could not be reached or is shutting down: it is suspected for one membership
  expiry, requests go to the next owner by rendezvous over the others (who will own the model
  once the suspect's membership expires), and they carry the suspects' ids so that replica
  takes them although its own view still lists the suspect as live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import grpc
import redis.asyncio as redis
from google.rpc import error_details_pb2, status_pb2
from shepherd.scheduler.v1 import scheduler_pb2_grpc

from libs.credentials import Credentials
from libs.errors import STATUS_DETAILS_KEY, unpack_details
from libs.membership import NOT_OWNER_REASON, UNREACHABLE_METADATA, MemberReader, owner_of
from libs.peers import PeerChannel, open_channel
from libs.tasks import supervise
from services.router.multiplex import InferManyClient

_log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str]]
# How gRPC and the service gate word a replica that is not there to serve: the process is
# gone (refused or reset connection, closed socket) or shutting down.
_GONE = (
    "failed to connect",
    "connection refused",
    "connection reset",
    "socket closed",
    "broken pipe",
    "goaway",
    "end of tcp stream",
    "is shutting down",
)


class SchedulerDirectory:
    """Stubs for the scheduler replicas, chosen per model."""

    def __init__(
        self,
        address: str,
        credentials: Credentials,
        client: redis.Redis | None = None,
        cluster: str = "",
        *,
        poll_s: float = 0.5,
        suspect_s: float = 3.0,
        multiplex: bool = True,
    ) -> None:
        self._credentials = credentials
        self._fallback = open_channel(address, credentials)
        self._fallback_stub = scheduler_pb2_grpc.SchedulerServiceStub(self._fallback)
        # One InferMany stream per replica ("" for the fallback) carries its requests; none
        # when turned off, and none for a replica that answered UNIMPLEMENTED (older).
        self._multiplex = multiplex
        self._multiplexed: dict[str, InferManyClient] = {}
        if multiplex:
            self._multiplexed[""] = InferManyClient(self._fallback)
        self._plain: set[str] = set()
        self._reader = MemberReader(client, cluster) if client is not None and cluster else None
        self._poll_s = poll_s
        self._suspect_s = suspect_s
        self._members: dict[str, str] = {}
        self._channels: dict[str, tuple[str, PeerChannel, scheduler_pb2_grpc.SchedulerServiceStub]]
        self._channels = {}
        self._suspects: dict[str, float] = {}
        # model -> owner over all members, computed once per membership change.
        self._owners: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None

    @property
    def scale_out(self) -> bool:
        return self._reader is not None

    async def start(self) -> None:
        if self._reader is None:
            return
        try:
            await self.refresh()
        except redis.RedisError as error:
            _log.warning("scheduler members unreadable", extra={"error": str(error)})
        self._task = supervise("scheduler-members", self._loop)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self.refresh()
            except redis.RedisError as error:
                _log.warning("scheduler members unreadable", extra={"error": str(error)})

    async def refresh(self) -> None:
        """Read the members now (one round trip); concurrent callers share one read."""
        if self._reader is None:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._read())
        await asyncio.shield(self._refreshing)

    async def _read(self) -> None:
        assert self._reader is not None
        members = await self._reader.read()
        if members == self._members:
            return
        for replica, (address, channel, _) in list(self._channels.items()):
            if members.get(replica) != address:
                del self._channels[replica]
                multiplexed = self._multiplexed.pop(replica, None)
                if multiplexed is not None:
                    await multiplexed.close()
                await channel.close()
        for replica, address in members.items():
            if replica not in self._channels and address:
                channel = open_channel(address, self._credentials)
                self._channels[replica] = (
                    address,
                    channel,
                    scheduler_pb2_grpc.SchedulerServiceStub(channel),
                )
                if self._multiplex:
                    self._multiplexed[replica] = InferManyClient(channel)
        _log.info("scheduler members", extra={"members": sorted(members)})
        self._members = members
        self._owners = {}

    def _suspected(self) -> set[str]:
        now = time.monotonic()
        for replica, until in list(self._suspects.items()):
            if until <= now or replica not in self._members:
                del self._suspects[replica]
        return set(self._suspects)

    def route(self, model: str) -> tuple[str, scheduler_pb2_grpc.SchedulerServiceStub, Metadata]:
        """The replica id ("" for the fallback), its stub and the metadata for a request."""
        if not self._members:
            return "", self._fallback_stub, ()
        suspects = self._suspected() if self._suspects else set()
        if not suspects:
            owner = self._owners.get(model)
            if owner is None:
                owner = self._owners[model] = owner_of(model, self._channels) or ""
            if owner:
                return owner, self._channels[owner][2], ()
        owner = owner_of(model, (m for m in self._channels if m not in suspects))
        if owner is None:
            owner = owner_of(model, self._channels)
        if owner is None:
            return "", self._fallback_stub, ()
        metadata = ((UNREACHABLE_METADATA, ",".join(sorted(suspects))),) if suspects else ()
        return owner, self._channels[owner][2], metadata

    def multiplexed(self, replica: str) -> InferManyClient | None:
        """The InferMany stream to `replica`, as `route` named it ("" for the fallback); None
        when its requests go as InferStream calls."""
        if replica in self._plain:
            return None
        return self._multiplexed.get(replica)

    def unimplemented(self, replica: str) -> None:
        """`replica` does not serve InferMany (a version from before it, mid-upgrade): its
        requests go as InferStream calls from now on."""
        if replica not in self._plain:
            self._plain.add(replica)
            _log.warning(
                "scheduler replica does not serve InferMany; its requests use InferStream",
                extra={"replica": replica or "(configured address)"},
            )

    def retryable(self, replica: str, error: grpc.aio.AioRpcError) -> bool:
        """Whether a request that failed before any text may go once more (see the module
        doc), marking an unreachable replica as suspect."""
        if error.code() != grpc.StatusCode.UNAVAILABLE or not replica:
            return False
        status = None
        for key, value in error.trailing_metadata() or ():
            if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
                status = status_pb2.Status.FromString(value)
        if status is not None and any(
            isinstance(d, error_details_pb2.ErrorInfo) and d.reason == NOT_OWNER_REASON
            for d in unpack_details(status)
        ):
            return True
        message = (error.details() or "").lower()
        if not any(sign in message for sign in _GONE):
            return False  # the replica answered: its own verdict stands
        self._suspects[replica] = time.monotonic() + self._suspect_s
        _log.info(
            "scheduler replica unreachable; its models go to the next owner",
            extra={"replica": replica, "error": error.details() or ""},
        )
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for multiplexed in self._multiplexed.values():
            await multiplexed.close()
        self._multiplexed.clear()
        for _, channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()
        await self._fallback.close()
