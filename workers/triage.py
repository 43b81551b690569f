"""Triage: which rung of the ladder a job tries first.

In order: an explicit `route` (any tier name) wins; then hard rules (the prompt and its
answer do not fit the bottom rung's context window: the lowest rung that holds them; the
feature is pinned to a tier); then the scorer. The default scorer is the learned router
(`workers/router/`), which scores every rung below the top per (feature, tier), calibrates
each rung's threshold from the feature's target, learns from the fleet's outcomes, and
starts the job on the lowest rung whose score is below its threshold. Any other scorer
gives one p(needs a bigger model than the bottom), compared with a fixed threshold: the
bottom below it, the top above. The decision carries its score, its reason and the
scorer's version, and is recorded on the job.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tierfleet import constants as C
from tierfleet.envelope import JobSpec
from tierfleet.fleet import Fleet
from tierfleet.settings import Settings


class Scorer(Protocol):
    """p(the job needs a bigger model than the small tier), in [0, 1]."""

    @property
    def version(self) -> str: ...

    def score(self, job: JobSpec) -> float: ...


class Assessed(Protocol):
    score: float
    threshold: float
    explore: bool
    reason: str
    tier: str  # the rung the job starts on


@runtime_checkable
class Router(Scorer, Protocol):
    """A scorer that picks the starting rung itself (thresholds calibrated per feature
    and tier)."""

    def assess(self, job: JobSpec, ladder: Sequence[str]) -> Assessed: ...


_CODE = re.compile(
    r"```|\bdef |\bclass |\bfunction\b|\bSELECT\b|\bregex\b|\breturn\b|=>|\bbug\b|\bcompile",
    re.IGNORECASE,
)
_MATH = re.compile(
    r"\d+\s*[-+*/^%]\s*\d+|\bprove\b|\bprobability\b|\bequation\b|\bcalculate\b|\bintegral\b",
    re.IGNORECASE,
)
_STEPS = re.compile(
    r"\bstep[- ]by[- ]step\b|\bfirst\b.*\bthen\b|\bexplain why\b|\bplan\b|\btrade-?offs?\b|"
    r"\bcompare\b|\bjustify\b|^\s*\d+[.)]\s",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True, slots=True)
class RuleScorer:
    """A transparent baseline: structure that small models are known to get wrong
    (code, arithmetic, multi-step reasoning, long free-form answers) raises the score;
    a constrained output schema lowers it."""

    version: str = "rules-1"

    def score(self, job: JobSpec) -> float:
        text = "\n".join(m["content"] for m in job.messages)
        score = 0.15
        if _CODE.search(text):
            score += 0.35
        if _MATH.search(text):
            score += 0.25
        if _STEPS.search(text):
            score += 0.2
        if job.prompt_chars > 6000:
            score += 0.1
        if job.max_tokens >= 1024:
            score += 0.1
        if job.output_schema is not None:
            score -= 0.15
        return min(1.0, max(0.0, score))


@dataclass(frozen=True, slots=True)
class TriageDecision:
    tier: str
    reason: str
    score: float | None
    version: str


@dataclass(frozen=True, slots=True)
class Triage:
    scorer: Scorer
    threshold: float = 0.5
    fleet: Fleet = field(default_factory=lambda: Settings.from_env().fleet)
    pinned_features: Mapping[str, str] = field(default_factory=dict)

    @property
    def ladder(self) -> tuple[str, ...]:
        return self.fleet.names

    def decide(self, job: JobSpec) -> TriageDecision:
        version = self.scorer.version
        small, top = self.ladder[0], self.ladder[-1]
        if job.route != C.ROUTE_AUTO:
            if job.route in self.fleet:
                return TriageDecision(job.route, "route", None, version)
            # Checked at submission; a job sent before the ladder changed is routed here.
            decided = self.decide(dataclasses.replace(job, route=C.ROUTE_AUTO))
            why = f"route {job.route!r} is no tier of this ladder ({', '.join(self.ladder)})"
            return dataclasses.replace(decided, reason=f"{why}; {decided.reason}")
        needed = job.estimated_prompt_tokens + job.max_tokens
        bottom = self.fleet.bottom
        if not bottom.fits(needed):
            # The lowest rung whose context holds the prompt and its answer (the top, if none).
            start = next((t for t in self.fleet if t.fits(needed)), self.fleet.top)
            reason = f"context: ~{needed} tokens > {bottom.context_tokens}"
            if start is not self.fleet.top:
                reason += f" ({bottom.name}); {start.name} holds them"
            return TriageDecision(start.name, reason, None, version)
        pinned = self.pinned_features.get(job.feature)
        if pinned is not None:
            return TriageDecision(pinned, "pinned feature", None, version)
        if isinstance(self.scorer, Router):
            a = self.scorer.assess(job, self.ladder)
            return TriageDecision(a.tier, a.reason, a.score, version)
        score = self.scorer.score(job)
        tier = top if score >= self.threshold else small
        op = ">=" if tier == top else "<"
        return TriageDecision(tier, f"score {score:.2f} {op} {self.threshold:.2f}", score, version)
