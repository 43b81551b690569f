"""The HTTP API: jobs for services in any language.

    POST /v1/jobs          a job envelope; 202 and its id (idempotent on Idempotency-Key)
    GET  /v1/jobs/{id}     status, tier, result, attempts, cost
    GET  /healthz          the process answers
    GET  /readyz           Redis and Postgres answer
    GET  /openapi.json     this API, described

Every /v1 request carries `Authorization: Bearer <token>` (`tierfleet tokens create`); a
token submits and sees its own team's jobs only, and is held to its rate limit. Errors
come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so the clients
that already read those show the message.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, and
# those name what is local to `create_app`.

import dataclasses
import functools
import json
import logging
import time
from typing import Annotated, Any, ClassVar, cast

import orjson
import redis
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from kombu.exceptions import OperationalError as BrokerError
from limits import parse as parse_rate
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError as LedgerError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from producers.api import tokens
from producers.api.tokens import TokenInfo
from producers.client import Client
from tierfleet.db import Ledger, engine_from_settings
from tierfleet.envelope import MAX_ENVELOPE_BYTES, parse_envelope
from tierfleet.errors import InvalidEnvelope, JobNotFound
from tierfleet.models import Job
from tierfleet.resources import schemas_dir
from tierfleet.settings import Settings
from tierfleet.store import get_job
from tierfleet.transport import make_celery

log = logging.getLogger(__name__)

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
        self.limiter = MovingWindowRateLimiter(RedisStorage(url))
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
            raise _unavailable("the ledger (Postgres)") from None
        if info is None:
            raise ApiError(401, "the bearer token is not a token of this fleet", code="bad_token")
        if not info.active:
            raise ApiError(
                401, f"the bearer token {info.prefix}… ({info.id}) was revoked", code="revoked"
            )
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


def _unavailable(what: str) -> ApiError:
    return ApiError(
        503, f"{what} did not answer; try again shortly", code="unavailable",
        headers={"Retry-After": "5"},
    )  # fmt: skip


def create_app(
    settings: Settings, *, client: Client | None = None, redis_client: redis.Redis | None = None
) -> FastAPI:
    """The ASGI app. Without `client`, one is built from `settings` (DATABASE_URL,
    REDIS_URL)."""
    url = settings.redis_url_value()
    if url is None:
        from tierfleet.errors import ConfigurationError

        raise ConfigurationError("REDIS_URL is not set; e.g. redis://127.0.0.1:6379/0")
    if client is None:
        client = Client(settings, Ledger(engine_from_settings(settings)), make_celery(settings))
    api = Api(settings, client, redis_client or redis.Redis.from_url(url, socket_timeout=5))
    app = FastAPI(
        title="tierfleet",
        version=_version(),
        summary="Run LLM jobs on the cheapest model tier that passes validation.",
    )
    app.state.api = api

    def caller(
        authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
        _doc: Annotated[Any, Depends(_bearer)] = None,  # the bearer scheme, in the OpenAPI doc
    ) -> TokenInfo:
        return api.authenticate(authorization)

    Caller = Annotated[TokenInfo, Depends(caller)]

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        message = f"{where}: {first['msg']}"
        return ApiError(400, message, code="invalid_request", param=where).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "a service is down"}})
    def readyz() -> JSONResponse:
        """Redis and Postgres answer."""
        checks: dict[str, str] = {}
        try:
            api.redis.ping()
            checks["redis"] = "ok"
        except redis.RedisError as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
        try:
            with api.ledger.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["postgres"] = "ok"
        except LedgerError as exc:
            checks["postgres"] = f"error: {type(exc.orig).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    @app.post(
        "/v1/jobs",
        status_code=202,
        tags=["jobs"],
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": _envelope_schema()}}}},
        responses=_errors(400, 401, 409, 413, 429, 503),
    )  # fmt: skip
    async def submit_job(
        request: Request,
        who: Caller,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                max_length=200,
                description="A resubmit with the same key returns the same job.",
            ),
        ] = None,
    ) -> dict[str, str]:
        """Submit a job envelope (the fields of `schemas/job.schema.json`); its id comes
        back at once, and `GET /v1/jobs/{id}` follows it."""
        body = await _read_body(request, MAX_ENVELOPE_BYTES)
        envelope = _json_object(body)
        return await run_in_threadpool(_submit, api, who, envelope, idempotency_key)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], responses=_errors(401, 403, 404, 429, 503))
    def get_job_view(job_id: str, who: Caller) -> dict[str, Any]:
        """A job's status, tier, result, attempts and cost so far."""
        try:
            with api.ledger.session() as s:
                view = get_job(s, job_id)
        except JobNotFound:
            raise ApiError(404, f"no job with id {job_id!r}", code="not_found") from None
        except LedgerError:
            raise _unavailable("the ledger (Postgres)") from None
        if view.team != who.team:
            raise ApiError(403, f"job {job_id} is not a job of team {who.team!r}", code="forbidden")
        return view.to_dict()

    return app


def _submit(
    api: Api, who: TokenInfo, envelope: dict[str, Any], header_key: str | None
) -> dict[str, str]:
    if who.feature is not None:
        envelope.setdefault("feature", who.feature)
    key = envelope.get("idempotency_key")
    if header_key is not None:
        if key is not None and key != header_key:
            raise ApiError(
                400, "the Idempotency-Key header and the envelope's idempotency_key differ",
                code="idempotency_key_mismatch", param="idempotency_key",
            )  # fmt: skip
        envelope["idempotency_key"] = key = header_key
    try:
        spec = parse_envelope(envelope)
    except InvalidEnvelope as exc:
        raise ApiError(400, str(exc), code="invalid_envelope", param=exc.field or None) from None
    if key is not None:  # keys are the team's own: another team's same key is another job
        spec = dataclasses.replace(spec, idempotency_key=tokens.scoped_key(who.team, key))
    try:
        job_id = api.client.submit_spec(spec, team=who.team)
        with api.ledger.session() as s:
            owner = s.execute(select(Job.team).where(Job.id == job_id)).scalar_one()
    except LedgerError:
        raise _unavailable("the ledger (Postgres)") from None
    except (BrokerError, redis.RedisError):
        raise ApiError(
            503, "the broker (Redis) did not answer; the job may be saved: send the request "
            "again with the same Idempotency-Key", code="unavailable",
            headers={"Retry-After": "5"},
        ) from None  # fmt: skip
    if owner != who.team:
        raise ApiError(409, f"a job with id {job_id!r} exists already", code="conflict", param="id")
    return {"id": job_id, "url": f"/v1/jobs/{job_id}"}


async def _read_body(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise _too_large(cap)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise _too_large(cap)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(cap: int) -> ApiError:
    return ApiError(413, f"the request body is over its limit of {cap:,} bytes", code="too_large")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(
            400, f"the body is a JSON {type(data).__name__}, not an object", code="invalid_json"
        )
    return cast(dict[str, Any], data)


@functools.cache
def _envelope_schema() -> dict[str, Any]:
    """The job envelope's JSON Schema, as the OpenAPI document's request body."""
    schema = json.loads((schemas_dir() / "job.schema.json").read_text())
    return {k: v for k, v in schema.items() if not k.startswith("$")}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text_of: dict[int, str] = {
        400: "bad input, the field named", 401: "no token, or not a valid one",
        403: "another team's", 404: "not found", 409: "an id taken by another team's job",
        413: "over the size limit", 429: "over the token's rate limit",
        503: "Redis or Postgres did not answer",
    }  # fmt: skip
    return {s: {"description": text_of[s]} for s in statuses}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tierfleet")
    except PackageNotFoundError:
        return "0"


def app_from_env() -> FastAPI:
    """For `uvicorn --factory producers.api.app:app_from_env` (what `tierfleet serve` runs)."""
    return create_app(Settings.from_env())
