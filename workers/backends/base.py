"""The `ModelBackend` Protocol every tier's model client implements."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

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


@dataclass(frozen=True, slots=True)
class BatchState:
    """A provider batch as the provider reports it. `status` is `in_progress`,
    `canceling` or `ended`; `counts` has `processing`, `succeeded`, `errored`,
    `canceled` and `expired`."""

    id: str
    status: str
    created_at: dt.datetime
    counts: Mapping[str, int] = field(default_factory=dict)
    ended_at: dt.datetime | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@runtime_checkable
class BatchBackend(Protocol):
    """A `ModelBackend` that also runs requests in provider batches, at the provider's
    batch price. A result is read with `read_batch_result`, which returns the answer or
    raises as `complete` would (`RequestNotRun` for a request the provider never ran)."""

    def batch_request(self, job: JobSpec, custom_id: str) -> dict[str, Any]: ...

    def create_batch(self, requests: list[dict[str, Any]]) -> BatchState: ...

    def retrieve_batch(self, batch_id: str) -> BatchState: ...

    def cancel_batch(self, batch_id: str) -> BatchState: ...

    def list_batches(self, *, created_after: dt.datetime) -> Iterator[BatchState]: ...

    def batch_results(self, batch_id: str) -> Iterator[tuple[str, Any]]: ...

    def read_batch_result(self, result: Any, job: JobSpec) -> Completion: ...
