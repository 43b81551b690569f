"""The learned router on a ladder of more than two rungs (in-process memory): cold
thresholds per rung, per-(feature, tier) learning moving a feature's start up or keeping it
low, exploration one rung lower, the share target per rung, the decision's record."""

from __future__ import annotations

import pytest

from workers.router.memory import LocalMemory, Outcome
from workers.router.router import (
    MIN_OBSERVED,
    LearnedRouter,
    Target,
    Targets,
    _share_threshold,
)

LADDER = ("a", "b", "c")
TEXT = "Extract the invoice number from: 'INV-2291, due 3 May'"


def router(**target: float) -> LearnedRouter:
    goal = Target(**target) if target else Target(max_escalation_rate=0.2)
    return LearnedRouter(memory=LocalMemory(), targets=Targets(goal), explore=0.0)


def teach(r: LearnedRouter, feature: str, tier: str, escalated: bool, n: int) -> None:
    p = r.prior.score(TEXT)
    for _ in range(n):
        r.memory.learn(Outcome.answer(feature, p, p, escalated, tier))


def test_cold_thresholds_rise_from_cold_threshold_toward_one_so_hard_prompts_skip_rungs() -> None:
    r = router()
    assert [r.cold_for(i, 3) for i in range(2)] == [0.5, 0.75]
    assert [r.cold_for(i, 4) for i in range(3)] == pytest.approx([0.5, 2 / 3, 5 / 6])
    assert r.cold_for(0, 2) == 0.5  # two tiers: today's single cold threshold
    p = r.prior.score(TEXT)
    r.cold_threshold = p - 0.05  # the prior finds it above the bottom's, below the middle's
    a = r.assess_text(TEXT, "new", "job-1", LADDER)
    assert a.tier == "b" and a.score == pytest.approx(p)  # the middle rung's score decided
    assert a.reason.startswith("a: score ") and "; b: score " in a.reason
    assert "new feature" in a.reason
    r.cold_threshold = p + 0.01
    assert r.assess_text(TEXT, "new", "job-2", LADDER).tier == "a"


def test_a_feature_whose_bottom_answers_keep_failing_starts_on_the_middle_rung() -> None:
    r = router()
    assert r.assess_text(TEXT, "invoices", "j", LADDER).tier == "a"
    teach(r, "invoices", "a", escalated=True, n=30)
    teach(r, "invoices", "b", escalated=False, n=30)
    a = r.assess_text(TEXT, "invoices", "j", LADDER)
    assert a.tier == "b" and a.score < a.threshold
    assert a.score == pytest.approx(r.score_text(TEXT, "invoices", "b")[1])


def test_a_feature_whose_middle_answers_fail_too_starts_on_the_top() -> None:
    r = router()
    teach(r, "proofs", "a", escalated=True, n=MIN_OBSERVED)
    teach(r, "proofs", "b", escalated=True, n=MIN_OBSERVED)
    a = r.assess_text(TEXT, "proofs", "j", LADDER)
    assert a.tier == "c"
    assert a.score == pytest.approx(r.score_text(TEXT, "proofs", "b")[1])  # the rung below


def test_a_passing_feature_stays_on_the_bottom_and_others_are_not_moved() -> None:
    r = router()
    teach(r, "tags", "a", escalated=False, n=MIN_OBSERVED)
    teach(r, "proofs", "a", escalated=True, n=MIN_OBSERVED)
    assert r.assess_text(TEXT, "tags", "j", LADDER).tier == "a"
    assert r.memory.stats("tags", "b").n == 0  # per (feature, tier)
    assert r.score_text(TEXT, "tags", "a")[1] < r.prior.score(TEXT)


def test_exploration_starts_one_rung_lower() -> None:
    r = router()
    teach(r, "proofs", "a", escalated=True, n=MIN_OBSERVED)
    teach(r, "proofs", "b", escalated=True, n=MIN_OBSERVED)
    r.explore = 1.0
    a = r.assess_text(TEXT, "proofs", "j", LADDER)
    assert (a.tier, a.explore) == ("b", True) and a.reason.startswith("explore (one rung lower")


def test_a_share_target_applies_on_every_rung_and_counts_the_jobs_already_above() -> None:
    counts = [2.0] * 50  # 100 jobs evenly over the bins
    assert _share_threshold(counts, 0.3) == pytest.approx(35 / 50)
    # 20 more started above the rung: 120 reach it, 36 may go above, 16 more of these
    assert _share_threshold(counts, 0.3, above=20.0) == pytest.approx(42 / 50)
    assert _share_threshold(counts, 0.1, above=20.0) > 1.0  # over the quota: none above
    r = router(frontier_share=0.5)
    for i in range(MIN_OBSERVED):
        r.assess_text(TEXT, "f", f"job-{i}", LADDER)
    assert sum(r.memory.stats("f", "a").triaged) == MIN_OBSERVED  # decided on the bottom
    a = r.assess_text(TEXT, "f", "job-x", LADDER)
    assert "calibrated" in a.reason
