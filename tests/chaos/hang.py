"""A triage scorer that stalls on one kind of job, long enough for its worker to be
killed in the meantime."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tierfleet.envelope import JobSpec
from workers.triage import RuleScorer

HANG_S = 600.0


@dataclass(frozen=True, slots=True)
class HangScorer:
    version: str = "hang-1"

    def score(self, job: JobSpec) -> float:
        if any("[hang]" in m["content"] for m in job.messages):
            time.sleep(HANG_S)
        return RuleScorer().score(job)
