"""A triage scorer that raises on one kind of job, every time: a poison message."""

from __future__ import annotations

from dataclasses import dataclass

from tierfleet.envelope import JobSpec
from workers.triage import RuleScorer


class PoisonError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class PoisonScorer:
    version: str = "poison-1"

    def score(self, job: JobSpec) -> float:
        if any("[poison]" in m["content"] for m in job.messages):
            raise PoisonError("this job breaks the scorer")
        return RuleScorer().score(job)
