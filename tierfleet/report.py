"""Routing and cost figures for a set of jobs, read back from the ledger.

`baseline_usd` is what the same jobs would have cost all on the top rung's model: a job
that reached the top rung counts its attempts there; a job answered by a lower rung
counts its first attempt's tokens at the top model's prices.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tierfleet.constants import JobStatus
from tierfleet.models import Attempt, Job
from tierfleet.prices import ModelPrice, Usage


@dataclass
class Row:
    jobs: int = 0
    first_tier: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    escalated: int = 0
    succeeded: int = 0
    failed: int = 0
    cost_usd: Decimal = Decimal(0)
    baseline_usd: Decimal = Decimal(0)

    def add(self, other: Row) -> None:
        self.jobs += other.jobs
        for tier, n in other.first_tier.items():
            self.first_tier[tier] += n
        self.escalated += other.escalated
        self.succeeded += other.succeeded
        self.failed += other.failed
        self.cost_usd += other.cost_usd
        self.baseline_usd += other.baseline_usd

    @property
    def savings_pct(self) -> float:
        if not self.baseline_usd:
            return 0.0
        return float((1 - self.cost_usd / self.baseline_usd) * 100)

    def summary_line(self) -> str:
        return (
            f"summary: jobs={self.jobs} succeeded={self.succeeded} failed={self.failed} "
            f"escalated={self.escalated} cost_usd={self.cost_usd:.6f} "
            f"baseline_usd={self.baseline_usd:.6f} savings_pct={self.savings_pct:.1f}"
        )


def batch_report(session: Session, batch_id: str, top: ModelPrice, top_tier: str) -> dict[str, Row]:
    """Figures per `metadata.kind` (jobs without one are `other`) for one batch; `top` is
    the price of the top rung (`top_tier`), which the counterfactual is priced at."""
    jobs = session.execute(
        select(Job.id, Job.status, Job.payload).where(Job.batch_id == batch_id)
    ).all()
    attempts: dict[str, list[Attempt]] = defaultdict(list)
    for attempt in session.execute(
        select(Attempt).join(Job).where(Job.batch_id == batch_id).order_by(Attempt.seq)
    ).scalars():
        attempts[attempt.job_id].append(attempt)

    rows: dict[str, Row] = defaultdict(Row)
    for job_id, status, payload in jobs:
        row = rows[str((payload.get("metadata") or {}).get("kind", "other"))]
        row.jobs += 1
        row.succeeded += status == JobStatus.SUCCEEDED
        row.failed += status == JobStatus.FAILED
        tried = attempts.get(job_id, [])
        if not tried:
            continue
        row.first_tier[tried[0].tier] += 1
        row.escalated += len({a.tier for a in tried}) > 1
        row.cost_usd += sum((a.cost_usd for a in tried), Decimal(0))
        row.baseline_usd += all_top_usd(tried, top, top_tier)
    return dict(sorted(rows.items()))


def all_top_usd(tried: Sequence[Any], top: ModelPrice, top_tier: str) -> Decimal:
    """What one job would have cost on the top rung alone, from its attempts in order: its
    attempts on the top rung if it reached it, else its first attempt's tokens at the top
    model's prices."""
    on_top = [a for a in tried if a.tier == top_tier]
    if on_top:
        return sum((a.cost_usd for a in on_top), Decimal(0))
    first = tried[0]
    return top.cost_usd(Usage(input_tokens=first.input_tokens, output_tokens=first.output_tokens))


all_frontier_usd = all_top_usd  # the default fleet's name for it


def total(rows: dict[str, Row]) -> Row:
    out = Row()
    for row in rows.values():
        out.add(row)
    return out
