"""The chaos suite's table: one row per fault, as docs/RELIABILITY.md shows it."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shepherd.billing.v1 import billing_pb2

from tests.chaos.load import Outcome, failures_by_status


@dataclass(frozen=True)
class FaultRow:
    """What one fault did to the load, and what the ledger says afterwards."""

    fault: str
    requests: int
    answered: int
    failed: dict[str, int]  # requests that ended failed, by final status
    failed_attempts: dict[str, int]  # attempts that failed (most were retried), by status
    answered_twice: int
    billed_twice: int
    thrown_away: int  # answers computed, then withheld because they could not be billed
    lost_answers: int  # billed but never delivered
    ledger_nano: int
    answered_nano: int
    down_s: float  # from the kill until the component served again
    recovery_s: float | None  # from its return to the first success of a later request
    last_failure_after_return_s: float | None

    @classmethod
    def of(
        cls,
        fault: str,
        outcomes: Sequence[Outcome],
        usage: billing_pb2.GetTenantUsageResponse,
        billed: set[str],
        *,
        down_s: float,
        recovery_s: float | None,
        last_failure_after_return_s: float | None,
    ) -> FaultRow:
        """The row of a fault from what the callers saw (`outcomes`) and what the ledger holds
        (`usage`, and the request ids it `billed`)."""
        answered = [o for o in outcomes if o.ok]
        return cls(
            fault=fault,
            requests=len(outcomes),
            answered=len(answered),
            failed=failures_by_status([o for o in outcomes if not o.ok]),
            failed_attempts=failures_by_status(outcomes),
            answered_twice=sum(o.answers - 1 for o in answered)
            + sum(o.answered_id != o.request_id for o in answered),
            billed_twice=usage.requests - len(billed),
            thrown_away=sum(a.thrown_away for o in outcomes for a in o.attempts),
            lost_answers=len(billed - {o.request_id for o in answered}),
            ledger_nano=usage.cost.nano_usd,
            answered_nano=sum(o.cost_nano for o in answered),
            down_s=down_s,
            recovery_s=recovery_s,
            last_failure_after_return_s=last_failure_after_return_s,
        )


@dataclass
class ChaosReport:
    rows: list[FaultRow] = field(default_factory=list)

    def add(self, row: FaultRow) -> None:
        self.rows.append(row)

    def markdown(self) -> str:
        lines = [
            "| fault | requests | answered | failed (final) | failed attempts (retried) |"
            " answered twice | billed twice | computed answers thrown away |"
            " billed, not delivered | Σ ledger = Σ answered | down | first success after return |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            exact = "yes" if r.ledger_nano == r.answered_nano else "NO"
            recovery = "–" if r.recovery_s is None else f"{r.recovery_s * 1000:.0f} ms"
            lines.append(
                f"| {r.fault} | {r.requests} | {r.answered} | {_counts(r.failed)} |"
                f" {_counts(r.failed_attempts)} | {r.answered_twice} | {r.billed_twice} |"
                f" {r.thrown_away} | {r.lost_answers} | {exact}"
                f" ({r.ledger_nano:,} nano-USD) | {r.down_s:.1f} s | {recovery} |"
            )
        return "\n".join(lines)

    def write(self, directory: Path) -> None:
        if not self.rows:
            return
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "report.json").write_text(
            json.dumps([asdict(r) for r in self.rows], indent=2) + "\n"
        )
        table = self.markdown()
        (directory / "report.md").write_text(table + "\n")
        print("\n" + table, file=sys.stderr)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "0"
