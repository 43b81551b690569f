"""What a worker process holds: settings, ledger, prices, metrics, backends, policy.

Built once per process (after the fork, so no connection crosses it) by `runtime()`.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass

from celery import Celery

from tierfleet import constants as C
from tierfleet.db import Ledger, engine_from_settings
from tierfleet.errors import ConfigurationError
from tierfleet.metrics import Metrics
from tierfleet.prices import PriceBook
from tierfleet.settings import Settings
from workers.backends.base import ModelBackend
from workers.backends.sim import SimulatedBackend
from workers.policy import EscalationPolicy
from workers.triage import Scorer, Triage


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

    @classmethod
    def build(cls, settings: Settings, celery: Celery, ledger: Ledger | None = None) -> Runtime:
        prices = PriceBook.load(settings.prices_file)
        backends = make_backends(settings)
        for backend in backends.values():
            prices[backend.model]  # a model without a price stops the worker at start
        return cls(
            settings=settings,
            ledger=ledger or Ledger(engine_from_settings(settings)),
            prices=prices,
            metrics=Metrics.from_settings(settings),
            backends=backends,
            triage=Triage(
                scorer=load_scorer(settings.triage_scorer),
                threshold=settings.triage_threshold,
                context_tokens=settings.slm_context_tokens,
                pinned_features=settings.pinned_features,
            ),
            policy=EscalationPolicy(
                top_tier_max_attempts=settings.frontier_max_attempts,
                max_transient_retries=settings.max_transient_retries,
                base_delay_s=settings.retry_base_delay_s,
                max_delay_s=settings.retry_max_delay_s,
            ),
            celery=celery,
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


def make_backends(settings: Settings) -> dict[str, ModelBackend]:
    if not settings.use_sim_backends:
        raise ConfigurationError(
            "real model backends (VLLM_BASE_URL / ANTHROPIC_API_KEY) are not available in "
            "this version; set TIERFLEET_BACKEND=sim"
        )
    rates = {
        C.TIER_SLM: settings.sim_invalid_rate,
        C.TIER_FRONTIER: settings.sim_frontier_invalid_rate,
    }
    return {
        tier: SimulatedBackend(
            tier=tier,
            model=settings.model_for(tier),
            mean_latency_s=settings.sim_latency_s,
            invalid_rate=rates[tier],
            seed=settings.sim_seed,
        )
        for tier in C.TIER_LADDER
    }


_lock = threading.Lock()
_current: Runtime | None = None
_factory: tuple[Settings, Celery, Ledger | None] | None = None


def install(settings: Settings, celery: Celery, ledger: Ledger | None = None) -> None:
    """Say how this process's runtime is built; it is built on first use."""
    global _factory, _current
    with _lock:
        _factory = (settings, celery, ledger)
        _current = None


def reset_after_fork() -> None:
    global _current
    _current = None


def runtime() -> Runtime:
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                if _factory is None:
                    raise ConfigurationError("worker runtime used before install()")
                _current = Runtime.build(*_factory)
    return _current
