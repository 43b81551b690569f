"""The retry / escalate / fail decision, in one place.

Every tier task asks `EscalationPolicy.decide()` what to do with an attempt's outcome and
does exactly that; no task has its own retry logic.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from tierfleet.constants import TIER_LADDER, Outcome  # the default ladder


class Action(enum.StrEnum):
    SUCCEED = "succeed"
    RETRY = "retry"  # the same tier again, after `delay_s`
    ESCALATE = "escalate"  # the next tier up
    FAIL = "fail"  # terminal, with `reason`


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str = ""
    next_tier: str | None = None
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class EscalationPolicy:
    """Lower tiers escalate on a bad answer; the top tier gets `top_tier_max_attempts`
    tries at a valid answer. Transient faults retry on the same tier with exponential
    backoff (at least the provider's retry-after), `max_transient_retries` times."""

    ladder: Sequence[str] = TIER_LADDER
    top_tier_max_attempts: int = 2
    max_transient_retries: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0

    def next_tier(self, tier: str) -> str | None:
        index = list(self.ladder).index(tier)
        return self.ladder[index + 1] if index + 1 < len(self.ladder) else None

    def backoff_s(self, retries_so_far: int, retry_after_s: float | None = None) -> float:
        delay = min(self.max_delay_s, self.base_delay_s * 2.0**retries_so_far)
        return max(delay, retry_after_s or 0.0)

    def decide(
        self,
        *,
        tier: str,
        outcome: Outcome,
        reason: str = "",
        answers_on_tier: int = 1,
        transient_retries: int = 0,
        retry_after_s: float | None = None,
        not_run_before: int = 0,
    ) -> Decision:
        """`answers_on_tier` counts this tier's attempts that produced an answer (this
        one included); `transient_retries` counts faults already retried on this tier;
        `not_run_before` its earlier batch requests the provider never ran."""
        if outcome is Outcome.SUCCEEDED:
            return Decision(Action.SUCCEED)
        higher = self.next_tier(tier)

        if outcome in (Outcome.EXPIRED, Outcome.CANCELED):  # sent again once, then given up
            if not_run_before < 1:
                return Decision(Action.RETRY, reason)
            return Decision(
                Action.FAIL, f"{tier} batch request not run, {not_run_before + 1} times: {reason}"
            )

        if outcome in (Outcome.INVALID, Outcome.LOW_CONFIDENCE) or (
            outcome is Outcome.TIMEOUT and higher is not None
        ):
            if higher is not None:
                return Decision(Action.ESCALATE, reason, next_tier=higher)
            if answers_on_tier < self.top_tier_max_attempts:
                return Decision(Action.RETRY, reason)
            return Decision(
                Action.FAIL,
                f"{tier} answer still invalid after {answers_on_tier} attempts: {reason}",
            )

        if outcome in (Outcome.ERROR, Outcome.TIMEOUT):
            if transient_retries < self.max_transient_retries:
                delay = self.backoff_s(transient_retries, retry_after_s)
                return Decision(Action.RETRY, reason, delay_s=delay)
            if higher is not None:
                return Decision(Action.ESCALATE, f"{tier} unavailable: {reason}", next_tier=higher)
            return Decision(
                Action.FAIL, f"{tier} still failing after {transient_retries} retries: {reason}"
            )

        # Outcome.FAILED: the provider rejected the request itself.
        if higher is not None:
            return Decision(Action.ESCALATE, f"{tier} rejected the request: {reason}", higher)
        return Decision(Action.FAIL, f"{tier} rejected the request: {reason}")
