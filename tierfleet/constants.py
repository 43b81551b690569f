"""Every name that crosses a process boundary: queues, tasks, Redis keys, metrics.

Producers and workers agree on these and nothing else; change one here and both sides
move together.
"""

from __future__ import annotations

import enum
import uuid
from typing import Final

ENVELOPE_VERSION: Final = 1

# Tiers, cheapest first. The ladder a job climbs on escalation is `TIER_LADDER`.
TIER_SLM: Final = "slm"
TIER_FRONTIER: Final = "frontier"
TIER_LADDER: Final[tuple[str, ...]] = (TIER_SLM, TIER_FRONTIER)
ROUTE_AUTO: Final = "auto"

# Default queue names (overridable in settings: TIERFLEET_QUEUE_TRIAGE, ...).
QUEUE_TRIAGE: Final = "triage"
QUEUE_SLM: Final = "tier.slm"
QUEUE_FRONTIER: Final = "tier.frontier"

# Celery task names. Producers send by name; they never import the worker code.
TASK_TRIAGE: Final = "tierfleet.triage"
TASK_ATTEMPT: Final = "tierfleet.attempt"
TASK_TRIAGE_RANGE: Final = "tierfleet.triage_range"  # a bulk chunk: batch id, line range
TASK_RECONCILE: Final = "tierfleet.reconcile"  # periodic (beat): re-drives stranded jobs
QUEUE_CONTROL: Final = "tierfleet.control"  # the reconciler's: never behind a backlog

# Attempt ids are uuid5(this, "<job id>/<seq>"): the same attempt always has the same id.
ATTEMPT_ID_NAMESPACE: Final = uuid.UUID("6f1d3c2e-5b7a-4e8f-9a0b-1c2d3e4f5a6b")

# Redis keys. Celery (kombu) keeps each queue as a list named after the queue, and the
# messages delivered but not yet acknowledged in a hash and a sorted set.
REDIS_UNACKED: Final = "unacked"
REDIS_UNACKED_INDEX: Final = "unacked_index"
# Which of those a live worker holds: a key per worker process, expiring unless renewed
# (its value: the delivery tags it holds), and the set that names those keys.
REDIS_CONSUMER_PREFIX: Final = "tierfleet:consumer:"
REDIS_CONSUMERS: Final = "tierfleet:consumers"

# Metrics (DogStatsD). Tags: tier, model_name, model_provider, feature, outcome.
METRIC_PREFIX: Final = "tierfleet."
METRIC_JOBS_SUBMITTED: Final = METRIC_PREFIX + "jobs.submitted"
METRIC_JOBS_FINISHED: Final = METRIC_PREFIX + "jobs.finished"
METRIC_ATTEMPTS: Final = METRIC_PREFIX + "attempts"
METRIC_ESCALATIONS: Final = METRIC_PREFIX + "escalations"
METRIC_TOKENS_INPUT: Final = METRIC_PREFIX + "tokens.input"
METRIC_TOKENS_OUTPUT: Final = METRIC_PREFIX + "tokens.output"
METRIC_TOKENS_CACHE_READ: Final = METRIC_PREFIX + "tokens.cache_read"
METRIC_TOKENS_CACHE_WRITE: Final = METRIC_PREFIX + "tokens.cache_write"
METRIC_COST_USD: Final = METRIC_PREFIX + "cost_usd"
METRIC_ATTEMPT_LATENCY_MS: Final = METRIC_PREFIX + "attempt.latency_ms"
METRIC_JOB_DURATION_MS: Final = METRIC_PREFIX + "job.duration_ms"
METRIC_QUEUE_DEPTH: Final = METRIC_PREFIX + "queue.depth"
METRIC_QUEUE_UNACKED: Final = METRIC_PREFIX + "queue.unacked"
METRIC_QUEUE_OLDEST_S: Final = METRIC_PREFIX + "queue.oldest_wait_s"  # the oldest job waiting
METRIC_VLLM_WAITING: Final = METRIC_PREFIX + "vllm.requests_waiting"
METRIC_VLLM_RUNNING: Final = METRIC_PREFIX + "vllm.requests_running"
METRIC_REPLICAS_WANTED: Final = METRIC_PREFIX + "pool.replicas_wanted"  # tags: pool
LATENCY_BATCH: Final = "batch"  # a job that can wait: on the frontier, a provider batch
# periodic (beat): submit the frontier's collected batch-mode requests, ingest ended batches
TASK_BATCHES: Final = "tierfleet.batches"
QUEUE_BATCHES: Final = "tierfleet.batches"  # consumed by frontier workers (the API client)
METRIC_BATCH_REQUESTS: Final = METRIC_PREFIX + "provider_batches.requests"  # tags: event
TASK_DEPTH: Final = "tierfleet.depth"  # periodic (beat): queue depth and scaling as gauges
METRIC_JOBS_REDRIVEN: Final = METRIC_PREFIX + "jobs.redriven"  # tags: stage
METRIC_DEAD_LETTERS: Final = METRIC_PREFIX + "dead_letters"  # tags: task, reason


class JobStatus(enum.StrEnum):
    """A job's place in its life. Terminal: succeeded, failed, cancelled."""

    QUEUED = "queued"
    TRIAGED = "triaged"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES: Final = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class Outcome(enum.StrEnum):
    """What one attempt came to."""

    SUCCEEDED = "succeeded"  # a valid answer
    INVALID = "invalid"  # answer failed validation (parse, schema, rules, length stop)
    LOW_CONFIDENCE = "low_confidence"  # valid, but token logprobs under the threshold
    TIMEOUT = "timeout"  # the call exceeded the tier's timeout
    ERROR = "error"  # a transient provider fault (429, 529, 5xx, connection)
    FAILED = "failed"  # a permanent fault (bad request, auth)
    ABANDONED = "abandoned"  # its worker was lost mid-call (lease expired); not applied
    EXPIRED = "expired"  # a Message Batches request the provider never ran (24 h passed)
    CANCELED = "canceled"  # a Message Batches request cancelled before it ran


# A small-tier attempt with one of these outcomes escalates the job (the router's label).
ESCALATING_OUTCOMES: Final = frozenset({Outcome.INVALID, Outcome.LOW_CONFIDENCE, Outcome.TIMEOUT})


class ApiBatchState(enum.StrEnum):
    """How far the creation of an HTTP API batch (`POST /v1/batches`) got."""

    SUBMITTING = "submitting"  # its jobs are being written and sent (or the writer died)
    SUBMITTED = "submitted"  # every job written and sent: its status is its jobs'
    FAILED = "failed"  # a resumed submission found the input no longer valid
