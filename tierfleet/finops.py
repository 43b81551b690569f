"""The FinOps report: what the fleet spent over a window, on what, and what it saved.

From the ledger's attempts in the window (`created_at >= since`), streamed job by job:

- spend, attempts and jobs per group (feature, tier, model or batch);
- cost per succeeded job: the group's spend over its jobs that succeeded;
- escalation rate: of the jobs that tried a rung below the top, the share that escalated
  from one (in the default fleet: of the small tier's jobs);
- the rung each job started on (`started_on`), and the top-rung share (`frontier_share`,
  named after the default fleet's top rung): of the jobs attempted, the share whose first
  attempt was on the top rung;
- savings against the all-top-rung counterfactual: what the same jobs would have cost
  on the top rung's model alone (a job that reached the top rung counts its attempts
  there; a job answered lower down counts its first attempt's tokens at the top model's
  prices), less what they cost.

The ladder (`ladder`, cheapest first) says which rung is the top; attempts on a tier no
longer in the ladder count as below it.

Message Batches savings are a line of their own: what the attempts run in provider
batches would have cost at the standard price, less their batch price. (The
counterfactual above counts frontier attempts at what they cost, so the two do not
overlap.)

A feature whose escalation rate passes the threshold is named in `warnings`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import groupby
from typing import Any

from sqlalchemy import select

from tierfleet import constants as C
from tierfleet.constants import JobStatus
from tierfleet.db import Ledger, utc
from tierfleet.errors import InvalidEnvelope
from tierfleet.models import Attempt, Job
from tierfleet.prices import USD_QUANTUM, ModelPrice
from tierfleet.report import all_top_usd

GROUPS = ("feature", "tier", "model", "batch")
_DURATION = re.compile(r"^(\d+)([mhdw])$")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str) -> dt.timedelta:
    """`30m`, `24h`, `7d`, `2w`."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise InvalidEnvelope(f"--since {text!r}: give a duration such as 30m, 24h, 7d or 2w")
    return dt.timedelta(seconds=int(match.group(1)) * _UNIT_S[match.group(2)])


@dataclass
class Figures:
    spend_usd: Decimal = Decimal(0)
    baseline_usd: Decimal = Decimal(0)
    attempts: int = 0
    jobs: int = 0
    succeeded: int = 0
    tried_small: int = 0
    escalated: int = 0
    frontier_first: int = 0  # jobs whose first attempt was on the top rung
    started: dict[str, int] = field(default_factory=dict)  # jobs by the rung they started on

    @property
    def savings_usd(self) -> Decimal:
        return self.baseline_usd - self.spend_usd

    @property
    def savings_pct(self) -> float:
        return float(self.savings_usd / self.baseline_usd * 100) if self.baseline_usd else 0.0

    @property
    def cost_per_succeeded_usd(self) -> Decimal | None:
        return self.spend_usd / self.succeeded if self.succeeded else None

    @property
    def escalation_rate(self) -> float:
        return self.escalated / self.tried_small if self.tried_small else 0.0

    @property
    def frontier_share(self) -> float:
        """The top-rung share (the default fleet's top rung is `frontier`)."""
        return self.frontier_first / self.jobs if self.jobs else 0.0

    def to_dict(self) -> dict[str, Any]:
        per = self.cost_per_succeeded_usd
        return {
            "spend_usd": str(self.spend_usd),
            "baseline_usd": str(self.baseline_usd),
            "savings_usd": str(self.savings_usd),
            "savings_pct": round(self.savings_pct, 2),
            "attempts": self.attempts,
            "jobs": self.jobs,
            "succeeded": self.succeeded,
            "cost_per_succeeded_job_usd": None
            if per is None
            else str(per.quantize(Decimal("1e-8"))),
            "escalation_rate": round(self.escalation_rate, 4),
            "frontier_share": round(self.frontier_share, 4),
            "started_on": dict(self.started),
        }


@dataclass
class Report:
    since: dt.datetime
    until: dt.datetime
    by: str
    groups: dict[str, Figures]
    total: Figures
    # spend per day and tier, for the chart: {"2026-12-01": {"slm": Decimal, ...}}
    daily: dict[str, dict[str, Decimal]] = field(default_factory=dict)
    escalation_by_feature: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    batch_attempts: int = 0  # attempts run in provider message batches
    batch_spend_usd: Decimal = Decimal(0)  # what they cost, at the batch price
    batch_standard_usd: Decimal = Decimal(0)  # what they would have cost one request each
    ladder: tuple[str, ...] = C.TIER_LADDER  # cheapest first; the last is the top rung

    @property
    def top_tier(self) -> str:
        return self.ladder[-1]

    @property
    def batch_savings_usd(self) -> Decimal:
        return self.batch_standard_usd - self.batch_spend_usd

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "by": self.by,
            "ladder": list(self.ladder),
            "top_tier": self.top_tier,
            "groups": {k: v.to_dict() for k, v in self.groups.items()},
            "total": self.total.to_dict(),
            "daily_spend_usd": {
                d: {t: str(v) for t, v in tiers.items()} for d, tiers in self.daily.items()
            },
            "escalation_rate_by_feature": self.escalation_by_feature,
            "message_batches": {
                "attempts": self.batch_attempts,
                "spend_usd": str(self.batch_spend_usd),
                "standard_usd": str(self.batch_standard_usd),
                "savings_usd": str(self.batch_savings_usd),
            },
            "warnings": self.warnings,
        }


def build(
    ledger: Ledger,
    *,
    since: dt.timedelta,
    by: str,
    frontier: ModelPrice,
    escalation_warning: float = 0.2,
    now: dt.datetime | None = None,
    batch_discounts: Mapping[str, Decimal] | None = None,
    ladder: Sequence[str] = C.TIER_LADDER,
) -> Report:
    """`frontier`: the top rung's price, which the counterfactual is priced at; `ladder`:
    the tier names, cheapest first (the default fleet's when not given);
    `batch_discounts`: each model's batch price as a share of its standard one (the
    top model's alone, when not given)."""
    ladder = tuple(ladder)
    discounts = batch_discounts or {frontier.model: frontier.batch_discount}
    if by not in GROUPS:
        raise InvalidEnvelope(f"--by {by!r}: one of {', '.join(GROUPS)}")
    until = now or dt.datetime.now(dt.UTC)
    start = until - since
    groups: dict[str, Figures] = defaultdict(Figures)
    features: dict[str, Figures] = defaultdict(Figures)
    total = Figures()
    daily: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    n_batched, batch_spend, batch_standard = 0, Decimal(0), Decimal(0)
    for job, tried in _jobs_with_attempts(ledger, start):
        touched: dict[str, Figures] = {}
        for a in tried:
            g = touched.setdefault(_key(by, job, a), groups[_key(by, job, a)])
            g.spend_usd += a.cost_usd
            g.attempts += 1
            daily[utc(a.created_at).date().isoformat()][a.tier] += a.cost_usd
            if a.provider_batch_id is not None:
                discount = discounts.get(a.model) or Decimal(1)
                n_batched += 1
                batch_spend += a.cost_usd
                batch_standard += (a.cost_usd / discount).quantize(USD_QUANTUM)
        j = _job_figures(job, tried, frontier, ladder[-1])
        total.spend_usd += j.spend
        total.attempts += len(tried)
        of_feature = features[job["feature"]]
        for g in {id(x): x for x in (*touched.values(), total, of_feature)}.values():
            _count(g, j, baseline=by in ("feature", "batch") or g is total)
    report = Report(start, until, by, _ordered(groups, by, ladder), total, ladder=ladder)
    report.daily = {d: dict(t) for d, t in sorted(daily.items())}
    report.batch_attempts = n_batched
    report.batch_spend_usd, report.batch_standard_usd = batch_spend, batch_standard
    report.escalation_by_feature = {
        f: round(v.escalation_rate, 4) for f, v in sorted(features.items()) if v.tried_small
    }
    lower = "small-tier" if len(ladder) <= 2 else "lower-rung"
    for f, rate in report.escalation_by_feature.items():
        if rate > escalation_warning:
            report.warnings.append(
                f"feature {f!r}: {rate:.0%} of its {lower} jobs escalated "
                f"(above {escalation_warning:.0%}): they pay for two calls"
            )
    return report


@dataclass(frozen=True, slots=True)
class _JobFigures:
    spend: Decimal
    baseline: Decimal
    succeeded: bool
    tried_small: bool
    escalated: bool
    frontier_first: bool
    started: str


def _job_figures(
    job: dict[str, Any], tried: list[Any], top_price: ModelPrice, top: str
) -> _JobFigures:
    below = [a for a in tried if a.tier != top]
    return _JobFigures(
        spend=sum((a.cost_usd for a in tried), Decimal(0)),
        baseline=all_top_usd(tried, top_price, top),
        succeeded=job["status"] == JobStatus.SUCCEEDED,
        tried_small=bool(below),
        escalated=any(a.outcome in C.ESCALATING_OUTCOMES for a in below),
        frontier_first=tried[0].tier == top,
        started=str(tried[0].tier),
    )


def _count(g: Figures, j: _JobFigures, *, baseline: bool) -> None:
    """A job's counts on a group it touched. The counterfactual is a job's, so it is kept
    for groups of whole jobs (feature, batch) and the total, not per tier or model."""
    g.jobs += 1
    g.succeeded += j.succeeded
    g.tried_small += j.tried_small
    g.escalated += j.escalated
    g.frontier_first += j.frontier_first
    g.started[j.started] = g.started.get(j.started, 0) + 1
    if baseline:
        g.baseline_usd += j.baseline


def _ordered(groups: dict[str, Figures], by: str, ladder: tuple[str, ...]) -> dict[str, Figures]:
    """By name; tiers in ladder order (cheapest first), any no longer in it after."""
    if by != "tier":
        return dict(sorted(groups.items()))
    rank = {name: i for i, name in enumerate(ladder)}
    return dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def _key(by: str, job: dict[str, Any], a: Any) -> str:
    if by == "feature":
        return str(job["feature"])
    if by == "tier":
        return str(a.tier)
    if by == "model":
        return str(a.model)
    return str(job["batch_id"] or "(no batch)")


def _jobs_with_attempts(
    ledger: Ledger, start: dt.datetime
) -> Iterator[tuple[dict[str, Any], list[Any]]]:
    query = (
        select(
            Attempt.job_id, Attempt.seq, Attempt.tier, Attempt.model, Attempt.outcome,
            Attempt.cost_usd, Attempt.input_tokens, Attempt.output_tokens, Attempt.created_at,
            Attempt.provider_batch_id, Job.feature, Job.status, Job.batch_id,
        )
        .join(Job, Job.id == Attempt.job_id)
        .where(Attempt.created_at >= start)
        .order_by(Attempt.job_id, Attempt.seq)
    )  # fmt: skip
    with ledger.engine.connect() as conn:
        rows = conn.execution_options(yield_per=5000).execute(query)
        for _, group in groupby(rows, key=lambda r: r.job_id):
            tried = list(group)
            first = tried[0]
            yield (
                {"feature": first.feature, "status": first.status, "batch_id": first.batch_id},
                tried,
            )
