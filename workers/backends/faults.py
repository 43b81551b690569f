"""Provider faults mapped onto tierfleet's exception tree, the same way for every SDK.

The OpenAI and Anthropic SDKs share a shape (timeout, connection, and status errors that
carry the HTTP response), so one mapping serves both. The SDKs' own retries are switched
off (`max_retries=0`): the escalation policy is the one owner of retries, so that retry
counts never multiply and every try leaves an attempt row.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from collections.abc import Mapping

from tierfleet.errors import (
    ProviderOverloaded,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    TierfleetError,
)

MAX_RETRY_AFTER_S = 3600.0


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """`retry-after-ms`, or `retry-after` in seconds or as an HTTP date; None if absent."""
    if not headers:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return min(float(millis) / 1000, MAX_RETRY_AFTER_S)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    delta = (when - dt.datetime.now(dt.UTC)).total_seconds()
    return min(max(delta, 0.0), MAX_RETRY_AFTER_S)


def status_fault(
    provider: str, status: int, message: str, headers: Mapping[str, str] | None
) -> TierfleetError:
    """The tierfleet error for an HTTP error status from `provider`."""
    text = f"{provider} {status}: {message}"
    if status == 429:
        return RateLimited(text, retry_after_s=retry_after_s(headers))
    if status in (503, 529):
        return ProviderOverloaded(text, retry_after_s=retry_after_s(headers))
    if status == 408:
        return ProviderTimeout(text)
    if status >= 500:
        return ProviderUnavailable(text, retry_after_s=retry_after_s(headers))
    return ProviderRejected(text)


def timeout_fault(provider: str, timeout_s: float) -> ProviderTimeout:
    return ProviderTimeout(f"{provider} did not answer within {timeout_s:.1f}s")


def connection_fault(provider: str, exc: BaseException) -> ProviderUnavailable:
    return ProviderUnavailable(f"{provider} connection failed: {exc}")
