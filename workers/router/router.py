"""The learned router: the generic prior, adjusted per feature by what the fleet has seen,
against a threshold calibrated from the feature's target.

Score. `logit(score) = logit(prior) + offset(feature)`, where the offset is how far the
feature's observed rate of needing the frontier sits from the prior's mean on the same
prompts, shrunk toward zero by `PSEUDO_COUNT` imaginary outcomes at the prior's rate: a
feature whose small-model answers keep failing drifts to the frontier, one whose answers
keep passing stays small, and a new feature starts at the prior.

Threshold. Each feature has a target: the largest share of its jobs that may go to the
frontier (`frontier_share`), or the largest share of its small-tier jobs that may escalate
(`max_escalation_rate`). The threshold is the lowest (for a share) or the highest (for an
escalation rate) score bin edge that meets it, read off the feature's histograms once they
hold `MIN_OBSERVED` jobs. Before that, a new feature starts at `cold_threshold` (the small
tier first, unless the prior is fairly sure): the benchmark prompts the prior learnt from
are harder than most production work, so their calibration would send nearly everything
new to the frontier.

Exploration. A small deterministic share (`explore`) of the jobs above the threshold go to
the small tier anyway, so that a feature routed to the frontier keeps producing outcomes
to learn from.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tierfleet.envelope import JobSpec
from tierfleet.errors import ConfigurationError
from workers.router.memory import BINS, FeatureStats, LocalMemory, Memory, Outcome
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
    score: float
    threshold: float
    explore: bool
    reason: str


class LearnedRouter:
    """A triage scorer (`score`) that also calibrates its threshold (`assess`) and
    learns from outcomes (`learn_small`, `learn_escalation_failed`)."""

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

    def score_text(self, text: str, feature: str) -> tuple[float, float]:
        """(prior, routing score) of a prompt for a feature."""
        z = self.prior.logit(text)
        return sigmoid(z), sigmoid(z + self.offset(self.memory.stats(feature)))

    def score(self, job: JobSpec) -> float:
        return self.score_text(prompt_text(job), job.feature)[1]

    def assess(self, job: JobSpec) -> Assessment:
        return self.assess_text(prompt_text(job), job.feature, job.id)

    def assess_text(self, text: str, feature: str, key: str) -> Assessment:
        stats = self.memory.stats(feature)
        z = self.prior.logit(text)
        offset = self.offset(stats)
        score = sigmoid(z + offset)
        target = self.targets.for_feature(feature)
        threshold, source = self.threshold(stats, target)
        explore = score >= threshold and _fraction(key) < self.explore
        self.memory.triaged(feature, score)
        reason = (
            f"score {score:.2f} {'>=' if score >= threshold else '<'} {threshold:.2f} "
            f"({target.describe()}, {source}; offset {offset:+.2f} from {stats.n:.0f} outcomes)"
        )
        if explore:
            reason = "explore: " + reason
        return Assessment(sigmoid(z), score, threshold, explore, reason)

    # --- calibration -----------------------------------------------------------------

    def threshold(self, stats: FeatureStats, target: Target) -> tuple[float, str]:
        if target.frontier_share is not None:
            if sum(stats.triaged) >= MIN_OBSERVED:
                return _share_threshold(stats.triaged, target.frontier_share), "calibrated"
        else:
            assert target.max_escalation_rate is not None
            if sum(stats.observed) >= MIN_OBSERVED:
                rate = target.max_escalation_rate
                return _escalation_threshold(stats.observed, stats.escalated, rate), "calibrated"
        return self.cold_threshold, "new feature"

    def close(self) -> None:
        close = getattr(self.memory, "close", None)
        if close is not None:
            close()

    # --- learning --------------------------------------------------------------------

    def learn_small(self, job: JobSpec, score: float | None, escalated: bool) -> None:
        """A small-tier answer of `job` (triaged with `score`) was valid or escalated."""
        prior = self.prior.score(prompt_text(job))
        score = prior if score is None else score
        self.memory.learn(Outcome.small_tier(job.feature, prior, score, escalated))

    def learn_escalation_failed(self, job: JobSpec, score: float | None) -> None:
        """The frontier failed `job` after the small tier had: take its escalation back."""
        prior = self.prior.score(prompt_text(job))
        score = prior if score is None else score
        self.memory.learn(Outcome.taken_back(job.feature, prior, score))


def prompt_text(job: JobSpec) -> str:
    """What the router reads: the user turns (a shared system prompt says little about
    one job's difficulty)."""
    return "\n".join(m["content"] for m in job.messages if m.get("role") != "assistant")


def _fraction(key: str) -> float:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _edge(b: int) -> float:
    return b / BINS


def _share_threshold(counts: list[float], share: float) -> float:
    """The lowest bin edge with at most `share` of the jobs at or above it."""
    total = sum(counts)
    if total <= 0:
        return 0.5
    above = 0.0
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
