"""DogStatsD metrics, through the `datadog` package's client.

Names live in `tierfleet.constants`; tags are `tier` (a tier's name from the ladder, as
the caller gives it: no tier is named here), `model_name`, `model_provider`, `feature`
and `outcome`. Without `DD_AGENT_HOST` every call is a no-op.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Protocol

from datadog.dogstatsd.base import DogStatsd

from tierfleet import constants as C
from tierfleet.prices import Usage
from tierfleet.settings import Settings


class _Sink(Protocol):
    def increment(self, metric: str, value: float = 1, tags: list[str] | None = None) -> None: ...
    def distribution(self, metric: str, value: float, tags: list[str] | None = None) -> None: ...
    def gauge(self, metric: str, value: float, tags: list[str] | None = None) -> None: ...
    def close_socket(self) -> None: ...


class _NullSink:
    def increment(self, metric: str, value: float = 1, tags: list[str] | None = None) -> None:
        pass

    def distribution(self, metric: str, value: float, tags: list[str] | None = None) -> None:
        pass

    def gauge(self, metric: str, value: float, tags: list[str] | None = None) -> None:
        pass

    def close_socket(self) -> None:
        pass


class Metrics:
    """The fleet's metrics, one method per event."""

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    @classmethod
    def from_settings(cls, settings: Settings) -> Metrics:
        if not settings.dd_agent_host:
            return cls(_NullSink())
        client = DogStatsd(
            host=settings.dd_agent_host,
            port=settings.dd_dogstatsd_port,
            disable_telemetry=True,
            origin_detection_enabled=False,
        )
        return cls(client)

    def close(self) -> None:
        self._sink.close_socket()

    def gauge(self, metric: str, value: float, tags: list[str]) -> None:
        """A level (queue depth, replicas wanted), sent as it stands."""
        self._sink.gauge(metric, value, tags=tags)

    def job_submitted(self, *, feature: str, route: str) -> None:
        self._sink.increment(C.METRIC_JOBS_SUBMITTED, tags=[f"feature:{feature}", f"route:{route}"])

    def attempt(
        self,
        *,
        tier: str,
        model: str,
        provider: str,
        feature: str,
        outcome: str,
        usage: Usage,
        cost_usd: Decimal,
        latency_ms: int,
    ) -> None:
        tags = [
            f"tier:{tier}",
            f"model_name:{model}",
            f"model_provider:{provider}",
            f"feature:{feature}",
            f"outcome:{outcome}",
        ]
        s = self._sink
        s.increment(C.METRIC_ATTEMPTS, tags=tags)
        s.increment(C.METRIC_TOKENS_INPUT, usage.input_tokens, tags=tags)
        s.increment(C.METRIC_TOKENS_OUTPUT, usage.output_tokens, tags=tags)
        if usage.cache_read_tokens:
            s.increment(C.METRIC_TOKENS_CACHE_READ, usage.cache_read_tokens, tags=tags)
        if usage.cache_write_tokens:
            s.increment(C.METRIC_TOKENS_CACHE_WRITE, usage.cache_write_tokens, tags=tags)
        s.increment(C.METRIC_COST_USD, float(cost_usd), tags=tags)
        s.distribution(C.METRIC_ATTEMPT_LATENCY_MS, latency_ms, tags=tags)

    def escalation(self, *, from_tier: str, to_tier: str, feature: str, reason: str) -> None:
        tags = [
            f"tier:{from_tier}",
            f"to_tier:{to_tier}",
            f"feature:{feature}",
            f"outcome:{reason}",
        ]
        self._sink.increment(C.METRIC_ESCALATIONS, tags=tags)

    def job_finished(self, *, tier: str, feature: str, status: str, duration_ms: int) -> None:
        tags = [f"tier:{tier}", f"feature:{feature}", f"outcome:{status}"]
        self._sink.increment(C.METRIC_JOBS_FINISHED, tags=tags)
        self._sink.distribution(C.METRIC_JOB_DURATION_MS, duration_ms, tags=tags)

    def redriven(self, *, stage: str, count: int) -> None:
        """Jobs the reconciler sent again, by the stage they were stranded in."""
        self._sink.increment(C.METRIC_JOBS_REDRIVEN, count, tags=[f"stage:{stage}"])

    def dead_letter(self, *, task: str, reason: str) -> None:
        self._sink.increment(C.METRIC_DEAD_LETTERS, tags=[f"task:{task}", f"reason:{reason}"])

    def batch_requests(self, *, event: str, count: int, tier: str | None = None) -> None:
        """Message Batches requests, by `event` (`submitted` or `ingested`) and `tier`."""
        if count:
            tags = [f"event:{event}", *([f"tier:{tier}"] if tier else [])]
            self._sink.increment(C.METRIC_BATCH_REQUESTS, count, tags=tags)
