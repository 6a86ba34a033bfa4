"""Usage that billing cannot take yet waits on the router's disk, and is replayed until it can.

Why: an answer is computed at real cost (GPU time, a provider's invoice). When billing or its
Redis is down for a few seconds, throwing the answer away and asking the caller to retry
wastes that work and, under load, turns a short outage into hundreds of failed calls. So
when a record cannot be billed after a brief retry, the router appends it here, fsyncs, and
only then returns the answer; a supervised loop replays the spool to RecordUsageBatch about
twice a second until every record is billed. Billing is idempotent on (tenant, request id),
so a record that reached the ledger before its response was lost is billed once all the same.

The format is the simplest that survives a crash: segment files of length-prefixed
`RecordUsageRequest` messages. Appends go to `current.log` in groups (one write and one fsync
for every record that arrived meanwhile, as UsageRecorder groups calls); a replay round first
seals it (a rename, atomic), so writers and the replayer never share a file. A record whose
append did not complete was never acknowledged (its caller got an error, not an answer), so a
torn tail is dropped on reading. A record billing refuses outright (INVALID_ARGUMENT: it can
never be billed) goes to `rejected.log` and is logged, never retried for ever.

The spool is bounded (`max_records`): past that the router refuses to hand out unbilled
answers and the caller is told to retry with the same request id, as before spooling existed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from shepherd.billing.v1 import billing_pb2, billing_pb2_grpc

from libs.errors import ShepherdError
from libs.tasks import log_failure, supervise

_log = logging.getLogger(__name__)
_LENGTH = struct.Struct(">I")
_CURRENT = "current.log"
_REJECTED = "rejected.log"
# Statuses after which a record is kept for the next round; anything else is final.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE.value[0],
    grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
    grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
    grpc.StatusCode.ABORTED.value[0],
    grpc.StatusCode.UNKNOWN.value[0],
    grpc.StatusCode.INTERNAL.value[0],
}


def encode(record: billing_pb2.RecordUsageRequest) -> bytes:
    data = record.SerializeToString()
    return _LENGTH.pack(len(data)) + data


def decode(data: bytes) -> Iterator[billing_pb2.RecordUsageRequest]:
    """The complete records in `data`; a torn tail (a crash mid-append) is dropped."""
    offset = 0
    while offset + _LENGTH.size <= len(data):
        (size,) = _LENGTH.unpack_from(data, offset)
        start = offset + _LENGTH.size
        if start + size > len(data):
            return
        yield billing_pb2.RecordUsageRequest.FromString(data[start : start + size])
        offset = start + size


class UsageSpool:
    """Usage records on disk until billing has them; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        billing: billing_pb2_grpc.BillingServiceStub,
        *,
        max_records: int = 100_000,
        replay_interval_s: float = 0.5,
        batch_size: int = 500,
        call_timeout_s: float = 5.0,
    ) -> None:
        self._dir = directory
        self._billing = billing
        self._max_records = max_records
        self._interval_s = replay_interval_s
        self._batch_size = batch_size
        self._call_timeout_s = call_timeout_s
        self._waiting: list[tuple[bytes, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._pending = 0  # records on disk not yet billed (or rejected)
        self._oldest: float | None = None  # when the oldest of them was spooled (monotonic)
        # Appends and sealing never overlap: a record is in the file the replayer reads or
        # in the next one, never torn between them.
        self._file_lock = asyncio.Lock()
        self._replay_lock = asyncio.Lock()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Records waiting for billing."""
        return self._pending

    def oldest_age_s(self) -> float:
        """How long the oldest waiting record has waited (0 when none waits)."""
        return 0.0 if self._oldest is None else time.monotonic() - self._oldest

    def open(self) -> int:
        """Create the directory and count what a previous run left; returns that count."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self._pending = sum(len(self._read(path)) for path in self._segments(include_current=True))
        if self._pending:
            self._oldest = time.monotonic()
            _log.warning(
                "usage spool holds records from a previous run; replaying them to billing",
                extra={"records": self._pending, "spool": str(self._dir)},
            )
        return self._pending

    async def put(self, record: billing_pb2.RecordUsageRequest) -> None:
        """Append `record` durably (fsynced) before returning; raise UNAVAILABLE if full."""
        if self._pending + len(self._waiting) >= self._max_records:
            raise ShepherdError(
                grpc.StatusCode.UNAVAILABLE,
                f"billing has been unreachable for {self.oldest_age_s():.0f}s and this router's"
                f" usage spool is full ({self._max_records} records)",
            )
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((encode(record), done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="usage-spool-write")
            self._writer.add_done_callback(log_failure)
        await asyncio.shield(done)  # once handed to the writer, the append completes

    async def _write(self) -> None:
        """Append every waiting record with one write and one fsync, until none is left."""
        while self._waiting:
            group, self._waiting = self._waiting, []
            async with self._file_lock:
                try:
                    await asyncio.to_thread(self._append, b"".join(data for data, _ in group))
                except OSError as error:
                    failure = ShepherdError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"billing is unreachable and the usage spool cannot be written ({error})",
                    )
                    for _, done in group:
                        if not done.done():
                            done.set_exception(failure)
                    continue
                self._pending += len(group)
            if self._oldest is None:
                self._oldest = time.monotonic()
            for _, done in group:
                if not done.done():
                    done.set_result(None)

    def _append(self, data: bytes) -> None:
        fd = os.open(self._dir / _CURRENT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def start(self) -> None:
        """Start the replay loop (call once, on the running loop); a round that fails is
        logged and the loop restarted (libs/tasks.py)."""
        self._loop_task = supervise("usage-spool-replay", self._run_rounds, min_backoff_s=1.0)

    async def _run_rounds(self) -> None:
        while True:
            # Polled, not woken by appends: while billing is down each append would otherwise
            # cost a failing call. Half a second is the replay's added recovery time.
            if self._pending:
                await self.replay()
            await asyncio.sleep(self._interval_s)

    async def replay(self) -> bool:
        """One round: bill what the spool holds; True when it is empty afterwards."""
        async with self._replay_lock:
            return await self._replay()

    async def _replay(self) -> bool:
        async with self._file_lock:
            await asyncio.to_thread(self._seal)
        for path in self._segments(include_current=False):
            records = self._read(path)
            kept: list[billing_pb2.RecordUsageRequest] = []
            rejected: list[billing_pb2.RecordUsageRequest] = []
            reached = True
            for start in range(0, len(records), self._batch_size):
                group = records[start : start + self._batch_size]
                try:
                    response = await self._billing.RecordUsageBatch(
                        billing_pb2.RecordUsageBatchRequest(records=group),
                        timeout=self._call_timeout_s,
                    )
                except grpc.aio.AioRpcError as error:
                    kept.extend(records[start:])
                    reached = False
                    _log.info(
                        "billing still unreachable; usage stays spooled",
                        extra={"records": self._pending, "error": error.code().name},
                    )
                    break
                for record, outcome in zip(group, response.outcomes, strict=False):
                    if outcome.HasField("recorded"):
                        continue
                    if outcome.failure.code in _TRANSIENT:
                        kept.append(record)
                    else:
                        rejected.append(record)
                        _log.error(
                            "billing refused a spooled usage record; kept in rejected.log",
                            extra={
                                "request_id": record.request_id,
                                "tenant": record.tenant,
                                "error": outcome.failure.message,
                            },
                        )
                kept.extend(group[len(response.outcomes) :])
            await asyncio.to_thread(self._settle, path, kept, rejected)
            self._pending -= len(records) - len(kept)
            if not reached:
                return False
        if self._pending <= 0:
            self._pending = 0
            self._oldest = None
            return True
        return False

    def _segments(self, *, include_current: bool) -> list[Path]:
        sealed = sorted(self._dir.glob("sealed-*.log"))
        current = self._dir / _CURRENT
        return [*sealed, current] if include_current and current.exists() else sealed

    def _seal(self) -> None:
        """Move `current.log` aside so the replayer owns it and writers start a new one."""
        current = self._dir / _CURRENT
        if current.exists():
            current.rename(self._dir / f"sealed-{time.time_ns():020d}.log")

    @staticmethod
    def _read(path: Path) -> list[billing_pb2.RecordUsageRequest]:
        try:
            return list(decode(path.read_bytes()))
        except FileNotFoundError:
            return []

    def _settle(
        self,
        path: Path,
        kept: list[billing_pb2.RecordUsageRequest],
        rejected: list[billing_pb2.RecordUsageRequest],
    ) -> None:
        """Rewrite a segment with only what must be retried (atomically), or delete it."""
        if rejected:
            fd = os.open(self._dir / _REJECTED, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, b"".join(encode(r) for r in rejected))
                os.fsync(fd)
            finally:
                os.close(fd)
        if not kept:
            path.unlink(missing_ok=True)
            return
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(b"".join(encode(r) for r in kept))
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        temporary.replace(path)

    async def close(self, timeout_s: float) -> None:
        """Finish appends in progress, then try to empty the spool within `timeout_s`."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        if not self._pending:
            return
        try:
            await asyncio.wait_for(self.replay(), timeout_s)
        except TimeoutError:
            pass
        if self._pending:
            _log.warning(
                "stopping with usage still spooled; the next start replays it",
                extra={"records": self._pending, "spool": str(self._dir)},
            )
