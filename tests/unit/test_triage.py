from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tierfleet.envelope import JobSpec, parse_envelope
from tierfleet.settings import Settings
from workers.triage import RuleScorer, Triage


class FixedScorer:
    version = "fixed-1"

    def __init__(self, value: float) -> None:
        self.value = value

    def score(self, job: JobSpec) -> float:
        return self.value


def job(**fields: Any) -> JobSpec:
    return parse_envelope({"feature": "f", "prompt": "Is this review positive?", **fields})


def test_an_explicit_route_wins_over_everything() -> None:
    triage = Triage(FixedScorer(0.99), threshold=0.5, pinned_features={"f": "frontier"})
    decision = triage.decide(job(route="slm", prompt="x" * 100_000))
    assert (decision.tier, decision.reason, decision.score) == ("slm", "route", None)


def test_a_prompt_that_does_not_fit_the_small_context_goes_to_the_frontier() -> None:
    triage = Triage(FixedScorer(0.0), fleet=Settings(slm_context_tokens=8192).fleet)
    decision = triage.decide(job(prompt="word " * 8000, max_tokens=512))
    assert decision.tier == "frontier" and decision.reason.startswith("context")
    assert triage.decide(job(prompt="word " * 100)).tier == "slm"


def test_the_answer_budget_counts_against_the_context() -> None:
    triage = Triage(FixedScorer(0.0), fleet=Settings(slm_context_tokens=1000).fleet)
    assert triage.decide(job(prompt="word " * 100, max_tokens=2000)).tier == "frontier"


def test_a_pinned_feature_goes_to_its_tier() -> None:
    triage = Triage(FixedScorer(0.0), pinned_features={"legal-review": "frontier"})
    decision = triage.decide(job(feature="legal-review"))
    assert (decision.tier, decision.reason) == ("frontier", "pinned feature")


def test_the_score_is_compared_with_the_threshold_and_recorded() -> None:
    for score, tier in [(0.49, "slm"), (0.5, "frontier"), (0.9, "frontier")]:
        decision = Triage(FixedScorer(score), threshold=0.5).decide(job())
        assert (decision.tier, decision.score, decision.version) == (tier, score, "fixed-1")
        assert f"{score:.2f}" in decision.reason


def test_rule_scorer_ranks_code_and_reasoning_above_constrained_classification() -> None:
    scorer = RuleScorer()
    classify = scorer.score(job(output_schema="sentiment"))
    code = scorer.score(
        job(prompt="Find the bug:\n```python\ndef f(x):\n    return x +\n```", max_tokens=1024)
    )
    maths = scorer.score(job(prompt="Explain step by step: if 3 * 17 apples ... calculate"))
    assert classify < 0.5 <= code
    assert classify < maths
    assert all(0.0 <= s <= 1.0 for s in (classify, code, maths))


def test_the_scorer_is_pluggable_by_import_path() -> None:
    from tierfleet.errors import ConfigurationError
    from workers.runtime import load_scorer

    assert load_scorer("workers.triage:RuleScorer").version == "rules-1"
    with pytest.raises(ConfigurationError, match="TIERFLEET_TRIAGE_SCORER='nope:X'"):
        load_scorer("nope:X")


def test_a_route_to_a_tier_no_longer_on_the_ladder_is_routed_by_triage_and_says_so() -> None:
    # Routes are checked at submission; a job queued before the ladder changed may name a
    # tier that is gone: it is routed as `auto` would be, not lost.
    spec = job()
    stale = dataclasses.replace(spec, route="haiku")
    decision = Triage(FixedScorer(0.9), threshold=0.5).decide(stale)
    assert decision.tier == "frontier"
    assert decision.reason.startswith("route 'haiku' is no tier of this ladder (slm, frontier); ")
