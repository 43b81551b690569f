"""The exception tree. Everything tierfleet raises on purpose is a `TierfleetError`.

    TierfleetError
    ├── RetryableError            try again on the same tier, after a delay
    │   ├── ProviderTimeout       the model call took longer than the tier allows
    │   ├── RateLimited           429; carries the provider's retry-after
    │   ├── ProviderOverloaded    529 / 503
    │   ├── ProviderUnavailable   connection refused or dropped, other 5xx
    │   └── ServiceUnavailable    Postgres or Redis did not answer
    └── PermanentError            trying again with the same input cannot help
        ├── InvalidEnvelope       a job envelope breaks the contract (names the field)
        ├── InvalidOutput         a model answer failed validation (names the rule)
        ├── ConfigurationError    settings or data files are wrong (names the setting)
        │   └── LedgerNotMigrated the database lacks the tables this version needs
        ├── JobNotFound           no job with that id
        ├── ProviderRejected      4xx other than 429: bad request, auth, not found
        └── BudgetExhausted       a spend cap stops the attempt

Driver errors (psycopg, redis, httpx) are wrapped with `raise ... from exc`, so the
cause stays on the chain.
"""

from __future__ import annotations


class TierfleetError(Exception):
    """Root of every error tierfleet raises on purpose."""


class RetryableError(TierfleetError):
    """A transient fault: the same call may succeed later."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ProviderTimeout(RetryableError):
    pass


class RateLimited(RetryableError):
    pass


class ProviderOverloaded(RetryableError):
    pass


class ProviderUnavailable(RetryableError):
    pass


class ServiceUnavailable(RetryableError):
    pass


class PermanentError(TierfleetError):
    """The same input will fail the same way."""


class RequestNotRun(TierfleetError):
    """A request in a provider's message batch that was never run: `kind` is "expired"
    (the batch's 24 hours passed) or "canceled" (the batch was cancelled first)."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class InvalidEnvelope(PermanentError):
    """A job envelope breaks the contract. `field` is a JSON-pointer-like path."""

    def __init__(self, message: str, *, field: str = "", line: int | None = None) -> None:
        self.field = field
        self.line = line
        self.reason = message  # without the place
        where = []
        if line is not None:
            where.append(f"line {line}")
        if field:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class InvalidOutput(PermanentError):
    """A model answer failed validation; `rule` names what it broke."""

    def __init__(self, message: str, *, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


class ConfigurationError(PermanentError):
    pass


class LedgerNotMigrated(ConfigurationError):
    """The ledger's database has no tierfleet tables, or older ones: `tierfleet db
    upgrade` brings it to this version."""


class JobNotFound(PermanentError):
    pass


class ProviderRejected(PermanentError):
    pass


class BudgetExhausted(PermanentError):
    pass
