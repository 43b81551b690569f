"""The `ModelBackend` Protocol every tier's model client implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tierfleet.envelope import JobSpec
from tierfleet.prices import Usage


@dataclass(frozen=True, slots=True)
class Completion:
    """One model answer, as the validator and the ledger need it."""

    text: str
    usage: Usage
    finish_reason: str  # "stop", "length", "tool_use", ...
    mean_logprob: float | None = None


class ModelBackend(Protocol):
    """A model behind one tier. Raises `RetryableError` subclasses for transient faults
    (timeout, 429, 529, connection) and `ProviderRejected` for permanent ones."""

    tier: str
    model: str
    provider: str

    def complete(self, job: JobSpec, *, timeout_s: float) -> Completion: ...
