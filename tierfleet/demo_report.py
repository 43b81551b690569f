"""What `tierfleet demo` prints: where each kind of job started and finished on the
ladder, the climbs between rungs, the cost against the all-top-rung counterfactual, and
the summary line.

The summary line is the report's `summary: ...` line followed by ` tiers=NAME:SHARE,...`:
each rung's share of the finished jobs (succeeded or failed), by the rung that finished
them, as a fraction with three decimals, in ladder order (the shares add up to 1 within
rounding; all 0.000 when no job finished).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from tierfleet.constants import JobStatus
from tierfleet.models import Attempt, Job
from tierfleet.report import Row, total

_FINISHED = (JobStatus.SUCCEEDED, JobStatus.FAILED)


@dataclass(frozen=True)
class DemoResult:
    """The figures of one demo batch, by kind of job (`metadata.kind`, else `other`)."""

    ladder: tuple[str, ...]
    rows: dict[str, Row]
    finished_on: dict[str, Counter[str]] = field(default_factory=dict)  # kind: tier: jobs
    climbs: Counter[tuple[str, str]] = field(default_factory=Counter)  # (from, to): jobs

    @property
    def total(self) -> Row:
        return total(self.rows)

    def tier_shares(self) -> dict[str, float]:
        """Each rung's share of the finished jobs, by the rung that finished them."""
        finished: Counter[str] = Counter()
        for by_tier in self.finished_on.values():
            finished.update(by_tier)
        done = sum(finished.values())
        return {tier: finished[tier] / done if done else 0.0 for tier in self.ladder}

    def summary_line(self) -> str:
        shares = ",".join(f"{tier}:{share:.3f}" for tier, share in self.tier_shares().items())
        return f"{self.total.summary_line()} tiers={shares}"


def ladder_figures(
    session: Session, batch_id: str
) -> tuple[dict[str, Counter[str]], Counter[tuple[str, str]]]:
    """The rung that finished each finished job, by kind; and how many jobs climbed
    from each rung to the next (a job that climbed twice counts on both steps)."""
    finished_on: dict[str, Counter[str]] = defaultdict(Counter)
    for status, tier, payload in session.execute(
        select(Job.status, Job.tier, Job.payload).where(Job.batch_id == batch_id)
    ):
        if status in _FINISHED and tier is not None:
            finished_on[_kind(payload)][tier] += 1
    climbs: Counter[tuple[str, str]] = Counter()
    tiers: dict[str, list[str]] = defaultdict(list)
    for job_id, tier in session.execute(
        select(Attempt.job_id, Attempt.tier)
        .join(Job)
        .where(Job.batch_id == batch_id)
        .order_by(Attempt.job_id, Attempt.seq)
    ):
        tried = tiers[job_id]
        if not tried or tried[-1] != tier:
            tried.append(tier)
    for tried in tiers.values():
        climbs.update(itertools.pairwise(tried))
    return dict(finished_on), climbs


def _kind(payload: dict[str, object]) -> str:
    metadata = payload.get("metadata")
    return str(metadata.get("kind", "other")) if isinstance(metadata, dict) else "other"


def print_report(console: Console, result: DemoResult, *, note: str) -> None:
    """The routing table, the climbs and the cost table; `note` labels them (simulated)."""
    ladder, rows = result.ladder, result.rows
    routing = Table(title=f"Where each kind of job started and finished on the ladder ({note})")
    routing.add_column("kind")
    for header in ["jobs", *(f"start\n{t}" for t in ladder), *(f"end\n{t}" for t in ladder)]:
        routing.add_column(header, justify="right")
    routing.add_column("climbed", justify="right")
    routing.add_column("failed", justify="right")
    top = ladder[-1]
    cost = Table(title=f"Cost by kind of job, against every job on {top} ({note})")
    cost.add_column("kind")
    for header in ("jobs", "cost $", f"all-{top} $", "saved"):
        cost.add_column(header, justify="right")
    last = list(rows)[-1] if rows else None
    everything: Counter[str] = Counter()
    for by_tier in result.finished_on.values():
        everything.update(by_tier)
    for kind, row in [*rows.items(), ("all", result.total)]:
        ended = everything if kind == "all" else result.finished_on.get(kind, Counter())
        routing.add_row(
            kind,
            str(row.jobs),
            *(str(row.first_tier.get(t, 0)) for t in ladder),
            *(str(ended.get(t, 0)) for t in ladder),
            str(row.escalated),
            str(row.failed),
            end_section=kind == last,
        )
        cost.add_row(
            kind,
            str(row.jobs),
            f"{row.cost_usd:.4f}",
            f"{row.baseline_usd:.4f}",
            f"{row.savings_pct:.0f}%",
            end_section=kind == last,
        )
    console.print(routing)
    steps = [f"{a} → {b}: {result.climbs[a, b]}" for a, b in itertools.pairwise(ladder)]
    if steps:
        console.print(
            f"Climbs (an answer that failed validation, sent one rung up): {'; '.join(steps)}"
        )
    console.print(cost)
