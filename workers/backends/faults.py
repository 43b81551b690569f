"""Provider faults mapped onto tierfleet's exception tree, the same way for every SDK.

The OpenAI and Anthropic SDKs share a shape (timeout, connection, and status errors that
carry the HTTP response), so one mapping serves both. The SDKs' own retries are switched
off (`max_retries=0`): the escalation policy is the one owner of retries, so that retry
counts never multiply and every try leaves an attempt row.

A 200 whose body is no usable answer (not JSON, or JSON without the fields every answer
has) is a malformed response: transient, like a dropped connection, and never billed. The
SDKs build response objects without validating them (a missing field reads as None, a body
that is not JSON comes back as a str), so the backends read answers with `expect`,
`field` and `token_count`, which raise that fault naming what was wrong.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import json
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

import httpx2

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


def malformed_fault(provider: str, detail: str) -> ProviderUnavailable:
    """A response with no usable answer in it. There is no usage to bill, and the same
    call may well work next time (a proxy or a restarting server cut the body short), so
    it is retried like a dropped connection."""
    return ProviderUnavailable(f"{provider} sent a malformed response: {detail}")


def expect(provider: str, response: Any, kind: type, what: str) -> None:
    """`response` must be the SDK's object for an answer (`what`, for the message)."""
    if not isinstance(response, kind):
        shown = repr(response[:120]) if isinstance(response, str) else type(response).__name__
        raise malformed_fault(provider, f"expected {what}, got {shown}")


def field(provider: str, response: Any, path: str) -> Any:
    """The value at a dotted `path` of a response object ("usage.input_tokens",
    "choices.0.message"); a step that is missing or null is a malformed response."""
    value = response
    for part in path.split("."):
        if part.isdigit():
            index = int(part)
            value = value[index] if isinstance(value, list) and index < len(value) else None
        else:
            value = getattr(value, part, None)
        if value is None:
            raise malformed_fault(provider, f"no {path} in the response")
    return value


def token_count(provider: str, response: Any, path: str, *, required: bool = True) -> int:
    """A token count of the response's usage: a non-negative integer. An optional one that
    is absent counts 0; anything else is a malformed response (an answer must never be
    priced from a count that is not one)."""
    try:
        value = field(provider, response, path)
    except ProviderUnavailable:
        if required:
            raise
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise malformed_fault(provider, f"{path} is {value!r}, not a token count")
    return value


def pooled_client(max_connections: int) -> httpx2.Client:
    """An HTTP client that keeps a connection per worker thread alive."""
    limits = httpx2.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    return httpx2.Client(limits=limits)


@contextlib.contextmanager
def sdk_faults(provider: str, sdk: ModuleType, timeout_s: float) -> Iterator[None]:
    """Map the errors of a provider SDK (`openai`, `anthropic`: the same generated shape)
    onto tierfleet's tree, dropping the SDK's traceback and keeping its message."""
    try:
        yield
    except sdk.APITimeoutError:
        raise timeout_fault(provider, timeout_s) from None
    except sdk.APIConnectionError as exc:
        raise connection_fault(provider, exc) from None
    except sdk.APIResponseValidationError as exc:  # with strict response validation only
        raise malformed_fault(provider, str(exc.message)) from None
    except sdk.APIStatusError as exc:
        raise status_fault(
            provider, exc.status_code, error_message(exc), exc.response.headers
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # the SDK parsing a 200's body
        raise malformed_fault(provider, f"the body is not JSON ({exc})") from None


def error_message(exc: Any) -> str:
    """The provider's own words from an SDK status error (`{"error": {"message": ...}}`
    or the inner error object)."""
    body = exc.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])
    return str(exc.message)
