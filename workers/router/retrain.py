"""`tierfleet triage retrain`: the router's memory rebuilt from the ledger.

Replays, per (feature, tier) for every rung of the ladder but the top, every attempt that
gave an outcome there (a valid answer, or an escalation: invalid, low confidence, timed
out), and every triage decision, as the workers recorded them online, and replaces what
Redis holds in one transaction. An outcome is placed by the job's triage score on the rung
the job started on, by the prior's on a rung it climbed to (an earlier attempt on another
rung below the top escalated it); a decision counts on the rung whose score decided it
(the rung the job started on; the rung below the top for the top). Streams the ledger, so
memory stays flat in its size.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def rebuild(
    ledger: Ledger,
    memory: Memory,
    *,
    ladder: Sequence[str] = C.TIER_LADDER,
    progress: bool = False,
) -> dict[str, Any]:
    from tierfleet.models import Attempt, Job

    prior = load_prior()
    local = LocalMemory()
    below_top, top = list(ladder[:-1]), ladder[-1]
    later, earlier, first = aliased(Attempt), aliased(Attempt), aliased(Attempt)
    top_failed = and_(
        Job.status == JobStatus.FAILED,
        exists().where(later.job_id == Job.id, later.tier == top),
    )
    climbed = exists().where(
        earlier.job_id == Attempt.job_id,
        earlier.seq < Attempt.seq,
        earlier.tier != Attempt.tier,
        earlier.tier.in_(below_top),
        earlier.outcome.in_(list(C.ESCALATING_OUTCOMES)),
    )
    outcomes = (
        select(
            Attempt.outcome, Attempt.tier, Job.id, Job.feature, Job.route, Job.latency,
            Job.payload, Job.triage_score, top_failed.label("top_failed"),
            climbed.label("climbed"),
        )
        .join(Job, Job.id == Attempt.job_id)
        .where(
            Attempt.tier.in_(below_top),
            Attempt.outcome.in_([Outcome.SUCCEEDED, *C.ESCALATING_OUTCOMES]),
        )
        .order_by(Attempt.created_at)
    )  # fmt: skip
    started_on = (
        select(first.tier).where(first.job_id == Job.id).order_by(first.seq).limit(1)
    ).scalar_subquery()
    decisions = select(Job.feature, Job.triage_score, Job.tier, started_on.label("start")).where(
        Job.triage_score.is_not(None)
    )
    n_outcomes = n_decisions = 0
    with ledger.engine.connect() as conn, Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("outcomes below the top rung", total=None)
        rows = conn.execution_options(yield_per=BATCH).execute(outcomes)
        for row in rows:
            spec = JobSpec.from_row(
                id=row.id, feature=row.feature, route=row.route, latency=row.latency,
                payload=row.payload,
            )  # fmt: skip
            p = prior.score(prompt_text(spec))
            score = p if row.triage_score is None or row.climbed else float(row.triage_score)
            escalated = row.outcome in C.ESCALATING_OUTCOMES
            local.learn(Learnt.answer(row.feature, p, score, escalated, row.tier))
            if escalated and row.top_failed:
                local.learn(Learnt.taken_back(row.feature, p, score, row.tier))
            n_outcomes += 1
            bar.advance(task)
        task = bar.add_task("triage decisions", total=None)
        for row in conn.execution_options(yield_per=BATCH).execute(decisions):
            tier = _deciding_rung(row.start or row.tier, ladder)
            if tier is not None:
                local.triaged(row.feature, float(row.triage_score), tier)
                n_decisions += 1
            bar.advance(task)
    snapshot = local.snapshot()
    memory.reset(snapshot)
    features = {f for f, _ in snapshot}
    return {"features": len(features), "outcomes": n_outcomes, "decisions": n_decisions}


def _deciding_rung(start: str, ladder: Sequence[str]) -> str | None:
    """The rung whose score decided a start on `start` (None: not on this ladder)."""
    if len(ladder) == 2:
        return ladder[0]  # every routed decision is the bottom rung's
    if start not in ladder:
        return None
    return ladder[min(list(ladder).index(start), len(ladder) - 2)]
