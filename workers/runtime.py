"""What a worker process holds: settings, ledger, prices, metrics, backends, policy.

Built once per process (after the fork, so no connection crosses it) by `runtime()`,
from what `install()` was told: the settings, the Celery app, and which tiers this
worker serves (only their model clients are made, and only their settings are needed).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from celery import Celery

from tierfleet.db import Ledger, engine_from_settings
from tierfleet.errors import ConfigurationError
from tierfleet.fleet import Tier, pool_needs
from tierfleet.metrics import Metrics
from tierfleet.prices import PriceBook
from tierfleet.settings import Settings
from workers.backends.base import ModelBackend
from workers.backends.sim import SimulatedBackend, rung_invalid_rate
from workers.budgets import Budgets
from workers.policy import EscalationPolicy
from workers.triage import Scorer, Triage


@dataclass(frozen=True)
class WorkerSpec:
    """How to build a process's runtime."""

    settings: Settings
    celery: Celery
    ledger: Ledger | None = None  # None: a new engine from DATABASE_URL
    tiers: Sequence[str] | None = None  # the tiers whose model clients are needed (None: all)
    db_pool_size: int = 5  # at least the worker's thread count


@dataclass
class Runtime:
    settings: Settings
    ledger: Ledger
    prices: PriceBook
    metrics: Metrics
    backends: dict[str, ModelBackend]
    triage: Triage
    policy: EscalationPolicy
    celery: Celery
    owns_ledger: bool = field(default=True)
    budgets: Budgets = field(default_factory=Budgets)

    @classmethod
    def build(
        cls,
        settings: Settings,
        celery: Celery,
        ledger: Ledger | None = None,
        *,
        tiers: Sequence[str] | None = None,
        db_pool_size: int = 5,
    ) -> Runtime:
        prices = PriceBook.load(settings.prices_file)
        fleet = settings.fleet
        tiers = fleet.names if tiers is None else tiers
        backends = make_backends(settings, tiers, max_connections=max(db_pool_size, 8))
        for backend in backends.values():
            prices[backend.model]  # a model without a price stops the worker at start
        return cls(
            settings=settings,
            # No ping per checkout (a round trip per transaction): a dead connection
            # raises OperationalError, the pool is invalidated, the task retries.
            ledger=ledger
            or Ledger(engine_from_settings(settings, pool_size=db_pool_size, pool_pre_ping=False)),
            prices=prices,
            metrics=Metrics.from_settings(settings),
            backends=backends,
            triage=Triage(
                scorer=make_scorer(settings),
                threshold=settings.triage_threshold,
                fleet=fleet,
                pinned_features=settings.pinned_features,
            ),
            policy=EscalationPolicy(
                ladder=fleet.names,
                top_tier_max_attempts=fleet.top.max_attempts,
                max_transient_retries=settings.max_transient_retries,
                base_delay_s=settings.retry_base_delay_s,
                max_delay_s=settings.retry_max_delay_s,
            ),
            celery=celery,
            owns_ledger=ledger is None,
            budgets=Budgets(recheck_s=settings.budget_recheck_s, fleet=fleet),
        )

    def close(self) -> None:
        for backend in self.backends.values():
            close = getattr(backend, "close", None)
            if close is not None:
                close()
        close_scorer = getattr(self.triage.scorer, "close", None)
        if close_scorer is not None:
            close_scorer()
        self.metrics.close()
        if self.owns_ledger:
            self.ledger.engine.dispose()


def make_scorer(settings: Settings) -> Scorer:
    """The learned router (its memory in Redis, shared by the fleet; in the process when
    the broker is in-process), or the `module:factory` scorer the settings name."""
    if settings.triage_scorer != "learned":
        return load_scorer(settings.triage_scorer)
    from workers.router.memory import LocalMemory, Memory, RedisMemory
    from workers.router.router import LearnedRouter, Target, Targets

    url = settings.real_redis_url()
    memory: Memory = RedisMemory.from_url(url) if url is not None else LocalMemory()
    default = Target(
        frontier_share=settings.triage_frontier_share,
        max_escalation_rate=settings.triage_max_escalation_rate,
    )
    return LearnedRouter(
        memory=memory,
        targets=Targets.load(default, settings.triage_targets_file),
        explore=settings.triage_explore,
    )


def load_scorer(path: str) -> Scorer:
    """`module:Class` (or `module:factory`), called with no arguments."""
    module_name, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(
            f"TIERFLEET_TRIAGE_SCORER={path!r} cannot be loaded: {exc}"
        ) from None
    scorer: Scorer = factory()
    return scorer


def make_backends(
    settings: Settings, tiers: Sequence[str], *, max_connections: int = 64
) -> dict[str, ModelBackend]:
    """The model client for each tier in `tiers`: simulated, or the real one (whose
    client library is imported only here, only by a worker that needs it)."""
    backends: dict[str, ModelBackend] = {}
    for name in tiers:
        tier = settings.fleet.tier(name)
        if settings.simulated(tier):
            backends[name] = _simulated(settings, tier)
        elif tier.backend == "anthropic":
            backends[name] = _anthropic(settings, tier, max_connections)
        else:
            backends[name] = _openai(settings, tier, max_connections)
    return backends


def _simulated(settings: Settings, tier: Tier) -> SimulatedBackend:
    """A stand-in for `tier`'s model: its rate of invalid answers from its place on the
    ladder (TIERFLEET_SIM_INVALID_RATE at the bottom, ..._FRONTIER_... at the top)."""
    fleet = settings.fleet
    rate = rung_invalid_rate(
        settings.sim_invalid_rate,
        settings.sim_frontier_invalid_rate,
        fleet.index(tier.name),
        len(fleet),
    )
    return SimulatedBackend(
        tier=tier.name,
        model=tier.model,
        mean_latency_s=settings.sim_latency_s,
        invalid_rate=rate,
        seed=settings.sim_seed,
        provider="sim" if tier.backend == "sim" else f"sim-{tier.backend}",
        logprobs=tier.logprobs,
    )


def _endpoint(settings: Settings, tier: Tier) -> tuple[str | None, str | None]:
    """`tier`'s base URL and key, or a `ConfigurationError` naming what its pool lacks
    (`pool_needs`: what `tierfleet fleet show` says too)."""
    url, key = settings.tier_base_url(tier), settings.tier_api_key(tier)
    missing = pool_needs(tier, base_url=url, has_key=key is not None)
    if missing is None:
        return url, key
    what = {
        "vllm": f"a base URL: {missing} (e.g. http://vllm:8000/v1)",
        "openai": f"{missing} for OpenAI's API (or a base_url for a compatible server)",
    }.get(tier.backend, missing)
    raise ConfigurationError(
        f"tier {tier.name!r} ({tier.backend}) needs {what}, or TIERFLEET_BACKEND=sim for "
        "simulated models"
    )


def _openai(settings: Settings, tier: Tier, max_connections: int) -> ModelBackend:
    """A `vllm` rung (the OpenAI-compatible client plus vLLM's own parts) or an `openai`
    one: OpenAI's API, or any compatible server at its `base_url`."""
    url, key = _endpoint(settings, tier)
    if tier.backend == "vllm":
        from workers.backends.vllm import VLLMBackend

        assert url is not None  # a vllm rung's pool needs its URL
        return VLLMBackend(
            base_url=url, model=tier.model, tier=tier.name, api_key=key,
            logprobs=tier.logprobs, max_connections=max_connections,
        )  # fmt: skip
    from workers.backends.openai_api import OpenAIBackend

    return OpenAIBackend(
        base_url=url, model=tier.model, tier=tier.name, api_key=key,
        logprobs=tier.logprobs, max_connections=max_connections,
    )  # fmt: skip


def _anthropic(settings: Settings, tier: Tier, max_connections: int) -> ModelBackend:
    url, key = _endpoint(settings, tier)
    assert key is not None  # an anthropic rung's pool needs its key
    from workers.backends.anthropic_api import AnthropicBackend

    return AnthropicBackend(
        api_key=key,
        base_url=url,
        model=tier.model,
        tier=tier.name,
        prompt_cache=settings.anthropic_prompt_cache,
        max_connections=max_connections,
    )


_lock = threading.Lock()
_current: Runtime | None = None
_spec: WorkerSpec | None = None


def install(spec: WorkerSpec, current: Runtime | None = None) -> None:
    """Say how this process's runtime is built (it is built on first use), or hand over
    one already built."""
    global _spec, _current
    with _lock:
        _spec, _current = spec, current


def reset_after_fork() -> None:
    global _current
    _current = None


def runtime() -> Runtime:
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                if _spec is None:
                    raise ConfigurationError("worker runtime used before install()")
                _current = Runtime.build(
                    _spec.settings,
                    _spec.celery,
                    _spec.ledger,
                    tiers=_spec.tiers,
                    db_pool_size=_spec.db_pool_size,
                )
    return _current
