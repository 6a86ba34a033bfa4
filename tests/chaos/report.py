"""The chaos suite's table: one row per fault, as docs/RELIABILITY.md shows it."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path


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
