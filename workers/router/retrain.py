"""`tierfleet triage retrain`: the router's memory rebuilt from the ledger.

Replays, per feature, every small-tier attempt that gave an outcome (a valid answer, or an
escalation: invalid, low confidence, timed out) and every triage decision, as the workers
recorded them online, and replaces what Redis holds in one transaction. Streams the
ledger, so memory stays flat in its size.
"""

from __future__ import annotations

from typing import Any

from rich.progress import Progress
from sqlalchemy import and_, exists, select
from sqlalchemy.orm import aliased

from tierfleet import constants as C
from tierfleet.constants import JobStatus, Outcome
from tierfleet.db import Ledger
from tierfleet.envelope import JobSpec
from workers.router.memory import LocalMemory, Memory
from workers.router.memory import Outcome as Learnt
from workers.router.prior import load_prior
from workers.router.router import prompt_text

BATCH = 2000


def rebuild(ledger: Ledger, memory: Memory, *, progress: bool = False) -> dict[str, Any]:
    from tierfleet.models import Attempt, Job

    prior = load_prior()
    local = LocalMemory()
    small, top = C.TIER_LADDER[0], C.TIER_LADDER[-1]
    later = aliased(Attempt)
    frontier_failed = and_(
        Job.status == JobStatus.FAILED,
        exists().where(later.job_id == Job.id, later.tier == top),
    )
    outcomes = (
        select(
            Attempt.outcome, Job.id, Job.feature, Job.route, Job.latency, Job.payload,
            Job.triage_score, frontier_failed.label("frontier_failed"),
        )
        .join(Job, Job.id == Attempt.job_id)
        .where(
            Attempt.tier == small,
            Attempt.outcome.in_([Outcome.SUCCEEDED, *C.ESCALATING_OUTCOMES]),
        )
        .order_by(Attempt.created_at)
    )  # fmt: skip
    decisions = select(Job.feature, Job.triage_score).where(Job.triage_score.is_not(None))
    n_outcomes = n_decisions = 0
    with ledger.engine.connect() as conn, Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("small-tier outcomes", total=None)
        rows = conn.execution_options(yield_per=BATCH).execute(outcomes)
        for row in rows:
            spec = JobSpec.from_row(
                id=row.id, feature=row.feature, route=row.route, latency=row.latency,
                payload=row.payload,
            )  # fmt: skip
            p = prior.score(prompt_text(spec))
            score = p if row.triage_score is None else float(row.triage_score)
            escalated = row.outcome in C.ESCALATING_OUTCOMES
            local.learn(Learnt.small_tier(row.feature, p, score, escalated))
            if escalated and row.frontier_failed:
                local.learn(Learnt.taken_back(row.feature, p, score))
            n_outcomes += 1
            bar.advance(task)
        task = bar.add_task("triage decisions", total=None)
        for row in conn.execution_options(yield_per=BATCH).execute(decisions):
            local.triaged(row.feature, float(row.triage_score))
            n_decisions += 1
            bar.advance(task)
    snapshot = local.snapshot()
    memory.reset(snapshot)
    return {"features": len(snapshot), "outcomes": n_outcomes, "decisions": n_decisions}
