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

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import Annotated, Any, cast

import orjson
import redis
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import select, text
from sqlalchemy.exc import DataError
from sqlalchemy.exc import OperationalError as LedgerError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from producers import teams
from producers.api import batch_submit, batches
from producers.api.common import (
    Api,
    ApiError,
    BodyLimit,
    Caller,
    PathId,
    documented,
    unavailable,
)
from producers.api.tokens import TokenInfo
from producers.client import Client
from tierfleet.db import Ledger, engine_from_settings
from tierfleet.envelope import MAX_ENVELOPE_BYTES, parse_envelope
from tierfleet.errors import InvalidEnvelope, JobNotFound, LedgerNotMigrated, ServiceUnavailable
from tierfleet.models import Job
from tierfleet.resources import schemas_dir
from tierfleet.settings import Settings
from tierfleet.store import get_job
from tierfleet.transport import make_celery

log = logging.getLogger(__name__)


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

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # batches a crashed server left half-submitted: finished now, not when first read
        threading.Thread(
            target=batch_submit.resume_all, args=(api,), name="resume-batches", daemon=True
        ).start()
        yield

    app = FastAPI(
        title="tierfleet",
        version=_version(),
        summary="Run LLM jobs on the cheapest model tier that passes validation.",
        lifespan=lifespan,
    )
    app.state.api = api
    files_cap = settings.api_max_file_bytes + 64 * 1024  # and the multipart framing
    app.add_middleware(
        BodyLimit, default=MAX_ENVELOPE_BYTES, caps={("POST", "/v1/files"): files_cap}
    )

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        message = f"{where}: {first['msg']}"
        return ApiError(400, message, code="invalid_request", param=where).response()

    @app.exception_handler(DataError)
    async def _unstorable(_request: Request, exc: DataError) -> JSONResponse:
        # what got past the checks and the ledger refused (a NUL in a text field, say)
        message = f"a value the ledger cannot store: {str(exc.orig).splitlines()[0]}"
        return ApiError(400, message, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "http_error"
        )
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
        responses=documented(400, 401, 409, 413, 429, 503),
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
        envelope = _json_object(await request.body())  # BodyLimit holds it to its cap
        return await run_in_threadpool(_submit, api, who, envelope, idempotency_key)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], responses=documented(401, 404, 429, 503))
    def get_job_view(job_id: PathId, who: Caller) -> dict[str, Any]:
        """A job's status, tier, result, attempts and cost so far. Another team's job is
        a 404, as a job that does not exist: nothing tells that its id is taken."""
        try:
            with api.ledger.session() as s:
                view = get_job(s, job_id)
        except JobNotFound:
            view = None
        except LedgerError:
            raise unavailable("the ledger (Postgres)") from None
        if view is None or view.team != who.team:
            raise ApiError(404, f"no job with id {job_id!r}", code="not_found")
        return view.to_dict()

    batches.add_routes(app)
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
    try:  # the feature, a given id and key in the team's own space (producers.teams)
        parsed = parse_envelope(envelope, tiers=api.settings.fleet.names)
        spec = teams.scope_spec(who.team, parsed, own_id="id" in envelope, own_key=key is not None)
    except InvalidEnvelope as exc:
        raise ApiError(400, str(exc), code="invalid_envelope", param=exc.field or None) from None
    try:
        job_id = api.client.submit_spec(spec, team=who.team)
        with api.ledger.session() as s:
            owner = s.execute(select(Job.team).where(Job.id == job_id)).scalar_one()
    except (LedgerError, LedgerNotMigrated):
        raise unavailable("the ledger (Postgres)") from None
    except (BrokerError, redis.RedisError, ServiceUnavailable):
        raise ApiError(
            503, "the broker (Redis) did not answer; the job may be saved: send the request "
            "again with the same Idempotency-Key", code="unavailable",
            headers={"Retry-After": "5"},
        ) from None  # fmt: skip
    if owner != who.team:  # a job from outside the API holds the name: say no more of it
        raise ApiError(409, "the id or idempotency key is taken", code="conflict", param="id")
    return {"id": job_id, "url": f"/v1/jobs/{job_id}"}


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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tierfleet")
    except PackageNotFoundError:
        return "0"


def app_from_env() -> FastAPI:
    """For `uvicorn --factory producers.api.app:app_from_env` (what `tierfleet serve` runs)."""
    return create_app(Settings.from_env())
