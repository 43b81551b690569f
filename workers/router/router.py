"""The learned router: the generic prior, adjusted per (feature, tier) by what the fleet
has seen, against thresholds calibrated from the feature's target. A job starts on the
lowest rung whose score is below that rung's threshold; above every one, on the top.

Score. For each rung r below the top, `logit(score_r) = logit(prior) + offset(feature, r)`:
the prior's p(the prompt needs a bigger model), shifted by how far the feature's observed
rate of escalating from r sits from the prior's mean on the same prompts, shrunk toward
zero by `PSEUDO_COUNT` imaginary outcomes at the prior's rate: a feature whose answers on
r keep failing drifts above r, one whose answers keep passing stays, and a new feature
starts at the prior. Labels (taught by the tier workers, rebuilt by `retrain`): a valid
answer on r is a success of r, an escalation from r a failure of r, and a failure on the
top takes back the failures of the rungs that escalated the job. An outcome is placed in
the histograms by the job's recorded score when the job started on that rung, and by the
prior's score when it climbed there (its score on that rung was not recorded).

Threshold. Each feature has a target: the largest share of its small-tier jobs that may
escalate (`max_escalation_rate`), applied on every rung to that rung's outcomes; or the
largest share of its jobs that may start above a rung (`frontier_share`), applied on every
rung to the jobs that reach it: with a share s, at most s of the jobs start above the
bottom, about s*s above the second rung, and so on (s = 0.16 on Haiku, Sonnet, Opus gives
84% / 13% / 3%). Jobs that went above a rung are counted above it whatever their score
(only the deciding score is recorded). With two tiers both are today's single threshold.
A rung's threshold is read off its histograms once they hold `MIN_OBSERVED` jobs.

Cold start. Before that, rung r of a ladder of n starts at
`cold_threshold + (1 - cold_threshold) * r / (n - 1)`: 0.5 on the bottom, rising evenly
toward 1, so a prompt the prior finds hard skips rungs (with 0.5 and three rungs: below
0.5 the bottom, 0.5 to 0.75 the middle, above the top). The benchmark prompts the prior
learnt from are harder than most production work, so their calibration would send nearly
everything new up.

Exploration. A small deterministic share (`explore`) of the jobs that would start above
the bottom start one rung lower, so that every rung keeps producing outcomes to learn from.

Record. The decision's score is the score that decided: that of the rung the job starts on
(of the rung below the top, for the top). With more than one rung below the top the reason
names each rung the walk looked at, e.g. `slm: score 0.61 >= 0.50 (...); haiku: score 0.32
< 0.75 (...)`; with two tiers it is as before, `score 0.32 < 0.50 (...)`.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tierfleet import constants as C
from tierfleet.envelope import JobSpec
from tierfleet.errors import ConfigurationError
from workers.router.memory import (
    BINS,
    DEFAULT_TIER,
    FeatureStats,
    LocalMemory,
    Memory,
    Outcome,
)
from workers.router.prior import Prior, load_prior, logit, sigmoid

PSEUDO_COUNT = 10.0
MIN_OBSERVED = 50
EXPLORE = 0.05


@dataclass(frozen=True, slots=True)
class Target:
    frontier_share: float | None = None
    max_escalation_rate: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.frontier_share, self.max_escalation_rate) if v is not None]
        if len(given) != 1:
            raise ValueError("a target is one of frontier_share or max_escalation_rate")
        if not 0.0 <= given[0] <= 1.0:
            raise ValueError(f"a target is a share between 0 and 1, not {given[0]}")

    def describe(self) -> str:
        if self.frontier_share is not None:
            return f"frontier share <= {self.frontier_share:.0%}"
        return f"escalation <= {self.max_escalation_rate:.0%}"


@dataclass(frozen=True, slots=True)
class Targets:
    default: Target = field(default_factory=lambda: Target(max_escalation_rate=0.2))
    features: Mapping[str, Target] = field(default_factory=dict)

    def for_feature(self, feature: str) -> Target:
        return self.features.get(feature, self.default)

    @classmethod
    def load(cls, default: Target, path: Path | None) -> Targets:
        """`default`, and per-feature targets from a TOML file:

        [features.reviews]
        max_escalation_rate = 0.1
        [features.code-review]
        frontier_share = 0.5
        """
        if path is None:
            return cls(default)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"TIERFLEET_TRIAGE_TARGETS_FILE {path}: {exc}") from None
        features: dict[str, Target] = {}
        for name, spec in (doc.get("features") or {}).items():
            where = f"TIERFLEET_TRIAGE_TARGETS_FILE {path}: [features.{name}]"
            if not isinstance(spec, dict) or set(spec) - {"frontier_share", "max_escalation_rate"}:
                raise ConfigurationError(
                    f"{where}: give frontier_share or max_escalation_rate, nothing else"
                )
            try:
                features[name] = Target(**spec)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(f"{where}: {exc}") from None
        return cls(default, features)


@dataclass(frozen=True, slots=True)
class Assessment:
    prior: float
    score: float  # the score that decided (see the module's docstring)
    threshold: float
    explore: bool
    reason: str
    tier: str = DEFAULT_TIER  # the rung the job starts on


@dataclass(frozen=True, slots=True)
class _Rung:
    tier: str
    score: float
    threshold: float
    reason: str


class LearnedRouter:
    """A triage scorer (`score`) that also calibrates its thresholds and picks the
    starting rung (`assess`), and learns from outcomes (`learn`, `learn_escalation_failed`)."""

    def __init__(
        self,
        prior: Prior | None = None,
        memory: Memory | None = None,
        targets: Targets | None = None,
        explore: float = EXPLORE,
        cold_threshold: float = 0.5,
    ) -> None:
        self.prior = prior or load_prior()
        self.memory: Memory = memory or LocalMemory()
        self.targets = targets or Targets()
        self.explore = explore
        self.cold_threshold = cold_threshold
        self.version = f"{self.prior.version}+online"

    # --- scoring ---------------------------------------------------------------------

    def offset(self, stats: FeatureStats) -> float:
        if stats.n <= 0:
            return 0.0
        mean_prior = stats.prior_sum / stats.n
        observed = (stats.positives + PSEUDO_COUNT * mean_prior) / (stats.n + PSEUDO_COUNT)
        return logit(observed) - logit(mean_prior)

    def score_text(self, text: str, feature: str, tier: str = DEFAULT_TIER) -> tuple[float, float]:
        """(prior, routing score on `tier`) of a prompt for a feature."""
        z = self.prior.logit(text)
        return sigmoid(z), sigmoid(z + self.offset(self.memory.stats(feature, tier)))

    def score(self, job: JobSpec) -> float:
        return self.score_text(prompt_text(job), job.feature)[1]

    def assess(self, job: JobSpec, ladder: Sequence[str] = C.TIER_LADDER) -> Assessment:
        return self.assess_text(prompt_text(job), job.feature, job.id, ladder)

    def assess_text(
        self,
        text: str,
        feature: str,
        key: str,
        ladder: Sequence[str] = C.TIER_LADDER,
        *,
        record: bool = True,
    ) -> Assessment:
        """Where a prompt of `feature` starts on `ladder` (cheapest first); `key` (the
        job's id) picks the explored share; `record`: count the decision in the memory."""
        below_top = list(ladder[:-1])
        if not below_top:  # a one-rung ladder: nothing to decide
            return Assessment(self.prior.score(text), 0.0, 1.0, False, "one tier", ladder[0])
        z = self.prior.logit(text)
        target = self.targets.for_feature(feature)
        stats = [self.memory.stats(feature, t) for t in below_top]
        totals = [sum(s.triaged) for s in stats]
        walked: list[_Rung] = []
        start = len(below_top)  # the top, unless a rung's score is below its threshold
        for r, (tier, st) in enumerate(zip(below_top, stats, strict=True)):
            offset = self.offset(st)
            score = sigmoid(z + offset)
            cold = self.cold_for(r, len(ladder))
            threshold, source = self.threshold(st, target, cold=cold, above=sum(totals[r + 1 :]))
            reason = (
                f"score {score:.2f} {'>=' if score >= threshold else '<'} {threshold:.2f} "
                f"({target.describe()}, {source}; offset {offset:+.2f} from {st.n:.0f} outcomes)"
            )
            walked.append(_Rung(tier, score, threshold, reason))
            if score < threshold:
                start = r
                break
        explore = start > 0 and _fraction(key) < self.explore
        if explore:
            start -= 1
        decided = walked[min(start, len(below_top) - 1)]
        if record:
            self.memory.triaged(feature, decided.score, decided.tier)
        if len(below_top) == 1:
            reason = decided.reason
            prefix = "explore: "
        else:
            reason = "; ".join(f"{w.tier}: {w.reason}" for w in walked)
            prefix = f"explore (one rung lower, {ladder[start]}): "
        if explore:
            reason = prefix + reason
        return Assessment(
            sigmoid(z), decided.score, decided.threshold, explore, reason, ladder[start]
        )

    # --- calibration -----------------------------------------------------------------

    def cold_for(self, rung: int, rungs: int) -> float:
        """A new feature's threshold on `rung` (0: the bottom) of a ladder of `rungs`."""
        return self.cold_threshold + (1.0 - self.cold_threshold) * rung / max(1, rungs - 1)

    def threshold(
        self, stats: FeatureStats, target: Target, *, cold: float | None = None, above: float = 0.0
    ) -> tuple[float, str]:
        """A rung's threshold: calibrated from its histograms, or `cold` (default
        `cold_threshold`) while they are short. `above`: jobs already started above the
        rung (a share target counts them)."""
        if target.frontier_share is not None:
            if sum(stats.triaged) + above >= MIN_OBSERVED:
                share = target.frontier_share
                return _share_threshold(stats.triaged, share, above), "calibrated"
        else:
            assert target.max_escalation_rate is not None
            if sum(stats.observed) >= MIN_OBSERVED:
                rate = target.max_escalation_rate
                return _escalation_threshold(stats.observed, stats.escalated, rate), "calibrated"
        return (self.cold_threshold if cold is None else cold), "new feature"

    def close(self) -> None:
        close = getattr(self.memory, "close", None)
        if close is not None:
            close()

    # --- learning --------------------------------------------------------------------

    def learn(self, job: JobSpec, tier: str, score: float | None, escalated: bool) -> None:
        """An answer of `job` on `tier` (below the top) was valid or escalated; `score`
        places it in the histograms (None: the prior's)."""
        prior = self.prior.score(prompt_text(job))
        score = prior if score is None else score
        self.memory.learn(Outcome.answer(job.feature, prior, score, escalated, tier))

    def learn_escalation_failed(
        self, job: JobSpec, score: float | None, tier: str = DEFAULT_TIER
    ) -> None:
        """The top failed `job` after `tier` had escalated it: take that escalation back."""
        prior = self.prior.score(prompt_text(job))
        score = prior if score is None else score
        self.memory.learn(Outcome.taken_back(job.feature, prior, score, tier))


def prompt_text(job: JobSpec) -> str:
    """What the router reads: the user turns (a shared system prompt says little about
    one job's difficulty)."""
    return "\n".join(m["content"] for m in job.messages if m.get("role") != "assistant")


def _fraction(key: str) -> float:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _edge(b: int) -> float:
    return b / BINS


def _share_threshold(counts: list[float], share: float, above: float = 0.0) -> float:
    """The lowest bin edge with at most `share` of the jobs at or above it (`above`: jobs
    counted above whatever the edge)."""
    total = sum(counts) + above
    if total <= 0:
        return 0.5
    best = 1.0 + 1e-9  # nothing to the frontier
    for b in range(BINS - 1, -1, -1):
        above += counts[b]
        if above / total > share:
            break
        best = _edge(b)
    return best


def _escalation_threshold(observed: list[float], escalated: list[float], rate: float) -> float:
    """The highest bin edge below which at most `rate` of the small-tier jobs escalated
    (the escalation rate that threshold gives)."""
    best = 0.0  # everything to the frontier
    seen = failed = 0.0
    for b in range(BINS):
        seen += observed[b]
        failed += escalated[b]
        if seen and failed / seen <= rate:
            best = _edge(b + 1)
    return best if best < 1.0 else 1.0 + 1e-9
