"""What the HTTP API's routes share: the error shape, the process's handles (ledger,
broker, limiter), and the bearer-token dependency, `Caller`."""

from __future__ import annotations

import functools
import logging
import time
from typing import Annotated, Any, ClassVar

import redis
from fastapi import Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from limits import parse
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy.exc import OperationalError as LedgerError
from starlette.exceptions import HTTPException as StarletteHTTPException

from producers.api import tokens
from producers.api.tokens import TokenInfo
from producers.client import Client
from tierfleet.db import Ledger
from tierfleet.settings import Settings

log = logging.getLogger(__name__)
parse_rate = functools.lru_cache(maxsize=256)(parse)  # a token's rate, read per request

_bearer = HTTPBearer(auto_error=False, description="A token from `tierfleet tokens create`.")


class ApiError(Exception):
    """An error response: its status, message, and OpenAI's `type`, `code`, `param`."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
        404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
        429: "rate_limit_error", 503: "service_unavailable",
    }  # fmt: skip

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        kind = self.TYPES.get(self.status, "api_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}  # fmt: skip
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Api:
    """What the routes share: the client (ledger and broker), the limiter, Redis."""

    def __init__(self, settings: Settings, client: Client, redis_client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.ledger: Ledger = client.ledger
        self.redis = redis_client
        url = settings.redis_url_value()
        assert url is not None
        # a Redis that does not answer lets requests through (logged), after 2 s at most
        storage = RedisStorage(url, socket_timeout=2, socket_connect_timeout=2)
        self.limiter = MovingWindowRateLimiter(storage)
        self.default_rate = parse_rate(settings.api_rate_limit)

    def authenticate(self, authorization: str | None) -> TokenInfo:
        if not authorization:
            raise ApiError(
                401, "no bearer token: send `Authorization: Bearer <token>` (a token comes "
                "from `tierfleet tokens create --team TEAM`)", code="missing_token",
            )  # fmt: skip
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401, "the Authorization header must be `Bearer <token>`", code="invalid_auth"
            )
        try:
            info = tokens.lookup(self.ledger, token.strip())
        except LedgerError:
            raise unavailable("the ledger (Postgres)") from None
        if info is None:
            raise ApiError(401, "the bearer token is not a token of this fleet", code="bad_token")
        if not info.active:
            raise ApiError(
                401, f"the bearer token {info.prefix}… ({info.id}) was revoked", code="revoked"
            )
        if (why := tokens.unusable(info)) is not None:
            raise ApiError(401, why, code="invalid_team")
        self._limit(info)
        return info

    def _limit(self, info: TokenInfo) -> None:
        rate = parse_rate(info.rate_limit) if info.rate_limit else self.default_rate
        try:
            if self.limiter.hit(rate, "tierfleet-api", info.id):
                return
            reset_at, _ = self.limiter.get_window_stats(rate, "tierfleet-api", info.id)
        except redis.RedisError:
            log.warning("rate limiter unavailable; request let through", exc_info=True)
            return
        wait = max(1, round(reset_at - time.time()))
        raise ApiError(
            429, f"token {info.id} is over its rate limit of {rate}; retry in {wait} s",
            code="rate_limited", headers={"Retry-After": str(wait)},
        )  # fmt: skip


def unavailable(what: str) -> ApiError:
    return ApiError(
        503, f"{what} did not answer; try again shortly", code="unavailable",
        headers={"Retry-After": "5"},
    )  # fmt: skip


def caller(request: Request, _doc: Annotated[Any, Depends(_bearer)] = None) -> TokenInfo:
    """The token's record, once it has passed: present, known, not revoked, under its
    rate limit. (`_doc` documents the bearer scheme in the OpenAPI document.)"""
    api: Api = request.app.state.api
    return api.authenticate(request.headers.get("authorization"))


Caller = Annotated[TokenInfo, Depends(caller)]

# An id in a path or a query: printable (the ledger's text columns take no NUL; no id
# holds a control character), and no longer than the ledger's ids.
PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
PathId = Annotated[str, Path(max_length=64, pattern=PRINTABLE)]
QueryId = Annotated[str | None, Query(max_length=64, pattern=PRINTABLE)]


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of a route, for the OpenAPI document."""
    text_of: dict[int, str] = {
        400: "bad input, the field named", 401: "no token, or not a valid one",
        404: "not found (or another team's)", 409: "an id or Idempotency-Key used already",
        413: "over the size limit", 429: "over the token's rate limit",
        503: "Redis or Postgres did not answer",
    }  # fmt: skip
    return {s: {"description": text_of[s]} for s in statuses}


class BodyLimit:
    """ASGI middleware: a request body over its path's cap is refused with 413 as it
    arrives (a declared Content-Length at once; a chunked body at the byte that passes
    the cap), before it is parsed or spooled anywhere."""

    def __init__(self, app: Any, *, default: int, caps: dict[tuple[str, str], int]) -> None:
        self.app, self.default, self.caps = app, default, caps

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.caps.get((scope["method"], scope["path"]), self.default)
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > cap:
            await too_large(cap).response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise StarletteHTTPException(413, too_large(cap).message)
            return message

        await self.app(scope, limited, send)


def too_large(cap: int) -> ApiError:
    return ApiError(413, f"the request body is over its limit of {cap:,} bytes", code="too_large")
