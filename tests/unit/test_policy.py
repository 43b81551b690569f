from __future__ import annotations

import pytest

from tierfleet.constants import Outcome
from workers.policy import Action, EscalationPolicy

policy = EscalationPolicy(
    ladder=("slm", "frontier"),
    top_tier_max_attempts=2,
    max_transient_retries=3,
    base_delay_s=1.0,
    max_delay_s=10.0,
)


def test_a_valid_answer_finishes_the_job() -> None:
    assert policy.decide(tier="slm", outcome=Outcome.SUCCEEDED).action is Action.SUCCEED


@pytest.mark.parametrize("outcome", [Outcome.INVALID, Outcome.LOW_CONFIDENCE, Outcome.TIMEOUT])
def test_a_bad_small_answer_escalates_to_the_frontier(outcome: Outcome) -> None:
    decision = policy.decide(tier="slm", outcome=outcome, reason="schema")
    assert (decision.action, decision.next_tier) == (Action.ESCALATE, "frontier")


def test_the_top_tier_gets_its_allowed_attempts_then_fails_with_the_reason() -> None:
    first = policy.decide(tier="frontier", outcome=Outcome.INVALID, answers_on_tier=1)
    assert (first.action, first.delay_s) == (Action.RETRY, 0.0)
    last = policy.decide(
        tier="frontier",
        outcome=Outcome.INVALID,
        reason="schema: 'label' is required",
        answers_on_tier=2,
    )
    assert last.action is Action.FAIL
    assert "'label' is required" in last.reason and "2 attempts" in last.reason


def test_transient_faults_retry_on_the_same_tier_with_growing_backoff() -> None:
    delays = [
        policy.decide(tier="slm", outcome=Outcome.ERROR, transient_retries=n).delay_s
        for n in range(3)
    ]
    assert delays == [1.0, 2.0, 4.0]
    for n in range(3):
        assert policy.decide(tier="slm", outcome=Outcome.ERROR, transient_retries=n).action is (
            Action.RETRY
        )


def test_retry_after_is_honoured_and_backoff_is_capped() -> None:
    assert (
        policy.decide(
            tier="frontier", outcome=Outcome.ERROR, transient_retries=0, retry_after_s=7.5
        ).delay_s
        == 7.5
    )
    assert policy.backoff_s(20) == 10.0


def test_retries_are_bounded() -> None:
    down_small = policy.decide(tier="slm", outcome=Outcome.ERROR, transient_retries=3)
    assert (down_small.action, down_small.next_tier) == (Action.ESCALATE, "frontier")
    down_top = policy.decide(tier="frontier", outcome=Outcome.ERROR, transient_retries=3)
    assert down_top.action is Action.FAIL
    timeout_top = policy.decide(tier="frontier", outcome=Outcome.TIMEOUT, transient_retries=3)
    assert timeout_top.action is Action.FAIL


def test_a_rejected_request_escalates_below_the_top_and_fails_at_it() -> None:
    assert policy.decide(tier="slm", outcome=Outcome.FAILED).action is Action.ESCALATE
    assert policy.decide(tier="frontier", outcome=Outcome.FAILED).action is Action.FAIL
