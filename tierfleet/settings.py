"""One typed settings object, built once at start-up from the environment.

Nothing here reads the environment at import time: call `Settings.from_env()` where a
process starts (the CLI, the worker, `Client.from_env()`), and pass the object down.
Secrets (`ANTHROPIC_API_KEY`, passwords inside `DATABASE_URL` / `REDIS_URL`) are
`SecretStr`: they print as `**********` in reprs and logs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import SplitResult, parse_qsl, quote, urlencode, urlsplit

from pydantic import AliasChoices, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tierfleet import constants as C
from tierfleet.errors import ConfigurationError
from tierfleet.fleet import Fleet, Tier, default_fleet, load_fleet

BackendMode = Literal["auto", "sim", "real"]
MAX_OUTPUT_TOKENS = 32768  # the envelope's max_tokens ceiling


def _alias(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    """Every knob of the fleet. Environment names are in the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="TIERFLEET_",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
        env_ignore_empty=True,
    )

    # Connections. Bare names, as every deployment tool spells them.
    redis_url: SecretStr | None = Field(None, validation_alias=_alias("REDIS_URL"))
    database_url: SecretStr | None = Field(None, validation_alias=_alias("DATABASE_URL"))
    vllm_base_url: str | None = Field(None, validation_alias=_alias("VLLM_BASE_URL"))
    anthropic_api_key: SecretStr | None = Field(None, validation_alias=_alias("ANTHROPIC_API_KEY"))
    anthropic_base_url: str | None = Field(None, validation_alias=_alias("ANTHROPIC_BASE_URL"))
    vllm_api_key: SecretStr | None = Field(None, validation_alias=_alias("VLLM_API_KEY"))
    openai_api_key: SecretStr | None = Field(None, validation_alias=_alias("OPENAI_API_KEY"))
    openai_base_url: str | None = Field(None, validation_alias=_alias("OPENAI_BASE_URL"))
    dd_agent_host: str | None = Field(None, validation_alias=_alias("DD_AGENT_HOST"))
    dd_dogstatsd_port: int = Field(8125, validation_alias=_alias("DD_DOGSTATSD_PORT"))

    # `sim` forces simulated backends; `auto` uses them unless VLLM_BASE_URL /
    # ANTHROPIC_API_KEY are set (or a fleet file is given); `real` refuses to start
    # without them.
    backend: BackendMode = Field("auto", validation_alias=_alias("TIERFLEET_BACKEND"))

    # The ladder (`tierfleet/fleet.py`): a TOML file of [[tier]] tables, cheapest first.
    # Unset: the two tiers below (slm on vLLM, frontier on Anthropic).
    fleet_file: Path | None = None
    _fleet: Fleet = PrivateAttr()

    queue_triage: str = C.QUEUE_TRIAGE
    queue_slm: str = C.QUEUE_SLM
    queue_frontier: str = C.QUEUE_FRONTIER

    slm_model: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    frontier_model: str = "claude-sonnet-4-6"

    # Triage.
    slm_context_tokens: int = Field(8192, gt=0)
    anthropic_prompt_cache: bool = True

    # Requests in flight per worker process (a thread each): vLLM batches them.
    slm_concurrency: int = Field(32, gt=0)
    frontier_concurrency: int = Field(32, gt=0)
    # Routing: "learned" is the trained prior adjusted per feature by the fleet's own
    # outcomes, thresholds calibrated from a target; or a `module:factory` scorer,
    # compared with TIERFLEET_TRIAGE_THRESHOLD.
    triage_scorer: str = "learned"
    triage_threshold: float = Field(0.5, ge=0.0, le=1.0)
    triage_max_escalation_rate: float | None = Field(0.2, ge=0.0, le=1.0)
    triage_frontier_share: float | None = Field(None, ge=0.0, le=1.0)
    triage_targets_file: Path | None = None
    triage_explore: float = Field(0.05, ge=0.0, le=1.0)
    pinned_features: dict[str, str] = Field(default_factory=dict)

    # Timeouts and retries.
    slm_timeout_base_s: float = Field(2.0, gt=0)
    slm_timeout_per_token_s: float = Field(0.02, ge=0)
    frontier_timeout_s: float = Field(120.0, gt=0)
    frontier_max_attempts: int = Field(2, ge=1)
    max_transient_retries: int = Field(5, ge=0)
    retry_base_delay_s: float = Field(1.0, ge=0)
    retry_max_delay_s: float = Field(60.0, ge=0)
    visibility_timeout_s: int = Field(3600, gt=0)

    # Durability. A running job is leased for its call's timeout plus the grace; a lease
    # that lapses means its worker was lost, and the reconciler runs the job again.
    lease_grace_s: float = Field(30.0, ge=0)
    reconcile_interval_s: float = Field(30.0, gt=0)
    # The HTTP API (`tierfleet serve`): requests a token may make, unless it has its own.
    api_rate_limit: str = "100/second"
    # Caps on an uploaded batch file (OpenAI's own: 200 MB, 50,000 requests).
    api_max_file_bytes: int = Field(100_000_000, gt=0)
    api_max_batch_lines: int = Field(50_000, gt=0)
    stale_after_s: float = Field(300.0, gt=0)
    max_worker_losses: int = Field(3, ge=1)
    max_task_errors: int = Field(3, ge=1)
    db_retry_s: float = Field(120.0, ge=0)

    # Message Batches (half price) for frontier jobs with `latency: batch`: `auto` uses
    # them when the frontier backend offers them (Anthropic), `off` never. A provider
    # batch goes out when `batch_min_requests` wait or the oldest has waited
    # `batch_max_wait_s`; the beat task looks every `batch_interval_s`. A job in a
    # provider batch is leased for `batch_lease_s` (the provider ends a batch within 24 h).
    # A worker sending or ingesting a provider batch holds it for `batch_lock_s` at a time.
    message_batches: Literal["auto", "off"] = "auto"
    batch_min_requests: int = Field(1000, ge=1, le=100_000)
    batch_max_requests: int = Field(100_000, ge=1, le=100_000)
    batch_max_bytes: int = Field(256 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    batch_max_wait_s: float = Field(60.0, ge=0)
    batch_interval_s: float = Field(10.0, gt=0)
    batch_lease_s: float = Field(26 * 3600.0, gt=0)
    batch_lock_s: float = Field(300.0, gt=0)

    # Daily budgets (`tierfleet budgets set`): how often a waiting job looks again.
    budget_recheck_s: float = Field(60.0, gt=0)

    # Operations: depth gauges, and the replicas each pool needs.
    depth_interval_s: float = Field(15.0, gt=0)
    scale_drain_s: float = Field(300.0, gt=0)
    scale_window_s: float = Field(900.0, gt=0)
    scale_triage_jobs_per_s: float = Field(200.0, gt=0)
    scale_triage_min: int = Field(1, ge=0)
    scale_triage_max: int = Field(8, ge=1)
    scale_slm_min: int = Field(1, ge=0)
    scale_slm_max: int = Field(8, ge=1)
    scale_frontier_min: int = Field(0, ge=0)
    scale_frontier_max: int = Field(20, ge=1)
    min_mean_logprob: float | None = None

    prices_file: Path | None = None

    # Simulated backends.
    sim_latency_s: float = Field(0.2, ge=0, validation_alias=_alias("TIERFLEET_SIM_LATENCY_S"))
    sim_invalid_rate: float = Field(
        0.15, ge=0, le=1, validation_alias=_alias("TIERFLEET_SIM_INVALID_RATE")
    )
    sim_frontier_invalid_rate: float = Field(0.0, ge=0, le=1)
    sim_seed: int = 0

    @field_validator("api_rate_limit")
    @classmethod
    def _a_rate(cls, value: str) -> str:
        from limits import parse

        try:
            parse(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate; e.g. '100/second', '6000/minute'") from None
        return value

    @model_validator(mode="after")
    def _the_ladder(self) -> Settings:
        self._build_ladder()
        return self

    def _build_ladder(self) -> None:
        try:
            fleet = load_fleet(self.fleet_file) if self.fleet_file else default_fleet(self)
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None
        self._fleet = fleet
        for feature, tier in self.pinned_features.items():
            if tier not in fleet:
                raise ValueError(
                    f"TIERFLEET_PINNED_FEATURES: feature {feature!r} is pinned to unknown "
                    f"tier {tier!r}; tiers are {', '.join(fleet.names)}"
                )

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: SecretStr | None) -> SecretStr | None:
        scheme = _scheme(value)
        if scheme is not None and scheme.split("+")[0] not in ("postgres", "postgresql", "sqlite"):
            raise ValueError(
                f"names a {scheme.split('+')[0]} database; the ledger is PostgreSQL (SQLite for "
                "the demo only), e.g. postgresql://postgres@127.0.0.1:5432/tierfleet"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_only(cls, value: SecretStr | None) -> SecretStr | None:
        scheme = _scheme(value)
        if scheme is not None and scheme not in ("redis", "rediss", "unix", "memory"):
            raise ValueError(
                f"is a {scheme}:// URL; the broker is Redis: redis://, rediss:// or unix://, "
                "e.g. redis://127.0.0.1:6379/0"
            )
        return value

    @model_validator(mode="after")
    def _scale_limits_in_order(self) -> Settings:
        for pool in ("triage", "slm", "frontier"):
            lo, hi = getattr(self, f"scale_{pool}_min"), getattr(self, f"scale_{pool}_max")
            if lo > hi:
                name = f"TIERFLEET_SCALE_{pool.upper()}"
                raise ValueError(f"{name}_MIN ({lo}) is above {name}_MAX ({hi})")
        return self

    @model_validator(mode="after")
    def _one_default_target(self) -> Settings:
        if self.triage_frontier_share is not None:
            self.triage_max_escalation_rate = None  # a frontier share, when given, wins
        elif self.triage_max_escalation_rate is None:
            raise ValueError(
                "set TIERFLEET_TRIAGE_MAX_ESCALATION_RATE or TIERFLEET_TRIAGE_FRONTIER_SHARE: "
                "the routing thresholds are calibrated from one of them"
            )
        return self

    @model_validator(mode="after")
    def _visibility_above_longest_wait(self) -> Settings:
        longest = max(
            *(tier.timeout_for(MAX_OUTPUT_TOKENS) for tier in self._fleet),
            self.retry_max_delay_s,
        )
        if self.visibility_timeout_s <= longest:
            raise ValueError(
                f"TIERFLEET_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must exceed the "
                f"longest call or retry delay ({longest:.0f}s), or Redis redelivers running jobs"
            )
        return self

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        return cls(**overrides)  # type: ignore[arg-type]

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with `update` applied, its ladder built again from the copy's values (the
        default ladder's timeouts, concurrency, scale limits and batches follow them)."""
        copy = super().model_copy(update=update, deep=deep)
        if update:
            copy._build_ladder()
        return copy

    # -- derived -------------------------------------------------------------

    @property
    def fleet(self) -> Fleet:
        """The ladder, cheapest first: the fleet file's, or the default two tiers."""
        return self._fleet

    @property
    def use_sim_backends(self) -> bool:
        """Every tier simulated: TIERFLEET_BACKEND=sim, or `auto` with the default
        ladder and neither VLLM_BASE_URL nor ANTHROPIC_API_KEY set."""
        if self.backend == "sim":
            return True
        if self.backend == "real" or self.fleet_file is not None:
            return False
        return self.vllm_base_url is None and self.anthropic_api_key is None

    def simulated(self, tier: Tier) -> bool:
        return self.use_sim_backends or tier.backend == "sim"

    def queue_for(self, tier: str) -> str:
        return self._fleet.queue_for(tier)

    def model_for(self, tier: str) -> str:
        return self._fleet.model_for(tier)

    def tier_api_key(self, tier: Tier) -> str | None:
        """The key of `tier`'s backend, from the variable it names (never stored on the
        tier, never logged)."""
        known = {
            "ANTHROPIC_API_KEY": self.anthropic_api_key,
            "VLLM_API_KEY": self.vllm_api_key,
            "OPENAI_API_KEY": self.openai_api_key,
        }
        if tier.api_key_env is None:
            return None
        if tier.api_key_env in known:
            secret = known[tier.api_key_env]
            return secret.get_secret_value() if secret else None
        return os.environ.get(tier.api_key_env) or None

    def tier_base_url(self, tier: Tier) -> str | None:
        """`tier`'s base URL: its own, or its backend's variable's."""
        if tier.base_url:
            return tier.base_url
        return {
            "VLLM_BASE_URL": self.vllm_base_url,
            "ANTHROPIC_BASE_URL": self.anthropic_base_url,
            "OPENAI_BASE_URL": self.openai_base_url,
        }.get(tier.url_env or "")

    def slm_timeout_s(self, max_tokens: int) -> float:
        return self.slm_timeout_base_s + self.slm_timeout_per_token_s * max_tokens

    def database_url_value(self) -> str | None:
        return _sqlalchemy_url(self.database_url.get_secret_value()) if self.database_url else None

    def redis_url_value(self) -> str | None:
        return self.redis_url.get_secret_value() if self.redis_url else None

    def real_redis_url(self) -> str | None:
        """REDIS_URL when the broker is a Redis server (not the demo's in-process one):
        what the reconciler, the depth readings and the router's memory need."""
        url = self.redis_url_value()
        return url if url and url.startswith(("redis://", "rediss://", "unix://")) else None


def env_names() -> dict[str, str]:
    """Setting name -> the environment variable that sets it."""
    out = {}
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        first = alias.choices[0] if isinstance(alias, AliasChoices) else None
        out[name] = first if isinstance(first, str) else f"TIERFLEET_{name.upper()}"
    return out


def _scheme(url: SecretStr | None) -> str | None:
    """The scheme of a URL setting, lowercased (never the rest: it may hold a password);
    None when unset or not `scheme://...` (the engine or broker then says what is wrong)."""
    if url is None:
        return None
    scheme, sep, _ = url.get_secret_value().partition("://")
    return (
        scheme.lower() if sep and scheme.isascii() and scheme.replace("+", "").isalnum() else None
    )


def _sqlalchemy_url(url: str) -> str:
    """Accept `postgres://` and `postgresql://` and pick the psycopg 3 driver. A password
    given as a query parameter (libpq's `?password=`) moves into the user part, the one
    place SQLAlchemy hides when it prints the URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql", "postgresql+psycopg"):
        return url
    parts = parts._replace(scheme="postgresql+psycopg")
    query = parse_qsl(parts.query, keep_blank_values=True)
    password = [value for key, value in query if key == "password"]
    if password and parts.password is None:
        user, _, host = parts.netloc.rpartition("@")
        rest = urlencode([(key, value) for key, value in query if key != "password"])
        netloc = f"{user}:{quote(password[-1], safe='')}@{host}"
        parts = parts._replace(netloc=netloc, query=rest)
    return _join(parts)


def redact_url(url: str) -> str:
    """`scheme://user:***@host/db`: a URL safe to print (a `password` query parameter is
    hidden too)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    in_query = any(key == "password" for key, _ in query)
    if parts.password is None and not in_query:
        return url
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if in_query:
        hidden = [(key, "***" if key == "password" else value) for key, value in query]
        parts = parts._replace(query=urlencode(hidden, safe="*"))
    return _join(parts)


def _join(parts: SplitResult) -> str:
    """`urlunsplit`, keeping the `//` of a URL with an empty host (`postgresql:///db`)."""
    out = f"{parts.scheme}://{parts.netloc}{parts.path}"
    if parts.query:
        out += f"?{parts.query}"
    if parts.fragment:
        out += f"#{parts.fragment}"
    return out
