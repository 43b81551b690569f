"""Creating an HTTP API batch, idempotently and so that a crash leaves nothing half-made.

`POST /v1/batches` writes the batch's row as `submitting` and submits its input file
(`producers.bulk.submit`, from the file's bytes in the ledger: no copy on disk) while it
holds the batch's advisory lock in Postgres; then the row is `submitted`. If the server
dies in between, Postgres drops the lock with its connection, and the next server to
start (`resume_all`), or the next request that reads the batch (its GET, the list, a
cancel, or the create sent again with the same Idempotency-Key), takes the lock and
submits it again: `bulk.submit` is idempotent per
batch and line, so it writes and sends what is missing and nothing twice. A reader that
finds the lock held leaves the batch to its creator, and shows it `validating`.

With an Idempotency-Key, the team's key names one batch: the same request again is that
batch, another request with it is a 409 naming the key.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import redis
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import delete, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import OperationalError as LedgerError

from producers import bulk
from producers.api.batch_files import options_for, summary
from producers.api.common import Api, ApiError
from producers.api.tokens import TokenInfo
from producers.jsonl import Input
from producers.teams import scoped_key
from tierfleet.constants import ApiBatchState
from tierfleet.db import Ledger
from tierfleet.errors import InvalidEnvelope
from tierfleet.models import ApiBatch, ApiFile

log = logging.getLogger(__name__)

_LOCK_SPACE = 0x7466  # the advisory locks of API batch submissions (two-key form)
WAIT_FOR_CREATOR_S = 120  # a cancel waits this long at most for a submission to end
_FAULTS = (LedgerError, BrokerError, redis.RedisError)
_SHOWN = {"meta": "metadata", "requests": "input file's requests"}  # as the caller names them


def create(api: Api, who: TokenInfo, request: dict[str, Any], key: str | None) -> ApiBatch:
    """The batch of `request` (input_file_id, endpoint, completion_window, metadata),
    made and submitted, or the one the team's `key` made already."""
    scoped = None if key is None else scoped_key(who.team, key)
    batch_id = "batch_" + secrets.token_hex(12)
    with _submission_lock(api.ledger, batch_id, wait=False):  # a new id: ours at once
        with api.ledger.session() as s:
            made = s.execute(
                postgresql.insert(ApiBatch)
                .values(id=batch_id, team=who.team, batch_id="b-" + batch_id,
                        state=ApiBatchState.SUBMITTING.value, idempotency_key=scoped,
                        feature=who.feature, **request)
                .on_conflict_do_nothing(index_elements=[ApiBatch.idempotency_key])
                .returning(ApiBatch.id)
            ).scalar_one_or_none()  # fmt: skip
        if made is not None:
            _submit_new(api, batch_id)
            return _get(api.ledger, batch_id)
    with api.ledger.session() as s:
        earlier = s.execute(select(ApiBatch).where(ApiBatch.idempotency_key == scoped)).scalar_one()
    _same_request(earlier, request, key or "")
    return settle(api, earlier)


def _same_request(earlier: ApiBatch, request: dict[str, Any], key: str) -> None:
    was = {name: getattr(earlier, name) for name in request}
    if was != request:
        differ = ", ".join(_SHOWN.get(n, n) for n in request if was[n] != request[n])
        raise ApiError(
            409, f"the Idempotency-Key {key!r} was sent with another request (batch "
            f"{earlier.id}; {differ} differ): a new batch needs a new key",
            code="idempotency_key_reused", param="Idempotency-Key",
        )  # fmt: skip


def _submit_new(api: Api, batch_id: str) -> None:
    """Submit a batch just made: an invalid input takes the batch away again (a 400);
    a fault of Redis or Postgres leaves it `submitting`, for a read or a retry to end."""
    row = _get(api.ledger, batch_id)
    try:
        outcome = _run(api, row)
    except _FAULTS:
        log.warning("batch submission cut short", exc_info=True,
                    extra={"action": "api.batch.submit_fault", "batch_id": batch_id})  # fmt: skip
        raise ApiError(
            503, f"Redis or Postgres did not answer: batch {batch_id} is saved and will be "
            "completed; send the request again with the same Idempotency-Key, or read the "
            "batch", code="unavailable", headers={"Retry-After": "5"},
        ) from None  # fmt: skip
    if outcome is not None:
        with api.ledger.begin() as conn:
            conn.execute(delete(ApiBatch).where(ApiBatch.id == batch_id))
        raise ApiError(400, outcome, code="invalid_file", param="input_file_id")
    _mark(api.ledger, batch_id, ApiBatchState.SUBMITTED)


def settle(api: Api, row: ApiBatch, *, wait: bool = False) -> ApiBatch:
    """The batch, its submission finished first if the process that began it is gone.
    With `wait`, waits for a live creator to end (a cancel must not race its writes)."""
    if row.state != ApiBatchState.SUBMITTING:
        return row
    with _submission_lock(api.ledger, row.id, wait=wait) as ours:
        if not ours:
            return row  # its creator is at it
        row = _get(api.ledger, row.id)
        if row.state != ApiBatchState.SUBMITTING:
            return row
        log.warning("resuming a batch submission cut short",
                    extra={"action": "api.batch.resume", "batch_id": row.id})  # fmt: skip
        try:
            outcome = _run(api, row)
        except _FAULTS:
            log.warning("batch submission cut short again", exc_info=True,
                        extra={"action": "api.batch.submit_fault", "batch_id": row.id})  # fmt: skip
            return row
        _mark(api.ledger, row.id, ApiBatchState.FAILED if outcome else ApiBatchState.SUBMITTED,
              error=outcome)  # fmt: skip
    return _get(api.ledger, row.id)


def resume_all(api: Api) -> int:
    """Finish every submission whose creator is gone (what `tierfleet serve` does as it
    starts, so that a batch cut short by a crash is finished even if nobody reads it);
    one another live process is at is left to it. Returns how many were finished."""
    with api.ledger.session() as s:
        rows = list(
            s.execute(
                select(ApiBatch).where(ApiBatch.state == ApiBatchState.SUBMITTING.value)
            ).scalars()
        )
    finished = 0
    for row in rows:
        try:
            done = settle(api, row)
        except Exception:  # a startup chore: a fault is logged, the next read tries again
            extra = {"action": "api.batch.resume_error", "batch_id": row.id}
            log.exception("cannot resume a batch submission", extra=extra)
            continue
        finished += done.state != ApiBatchState.SUBMITTING
    return finished


def _run(api: Api, row: ApiBatch) -> str | None:
    """Submit the batch's input (again). None once every job is written and sent, else
    why the input cannot be (then nothing of it is kept)."""
    with api.ledger.session() as s:
        name, content = s.execute(
            select(ApiFile.filename, ApiFile.content).where(ApiFile.id == row.input_file_id)
        ).one()
    options = options_for(row.feature, row.batch_id, row.team, api.settings.fleet.names)
    try:
        report = bulk.submit(Input.of_bytes(content, name), options, api.ledger,
                             api.client.celery, api.settings.queue_triage)  # fmt: skip
    except InvalidEnvelope as exc:
        return str(exc)
    if not report.submitted:  # checked at upload; only a change of configuration
        return summary(report.errors, report.error_count)
    return None


def _mark(ledger: Ledger, batch_id: str, state: ApiBatchState, error: str | None = None) -> None:
    with ledger.begin() as conn:
        conn.execute(
            update(ApiBatch).where(ApiBatch.id == batch_id).values(state=state.value, error=error)
        )


def _get(ledger: Ledger, batch_id: str) -> ApiBatch:
    with ledger.session() as s:
        return s.get_one(ApiBatch, batch_id)


@contextlib.contextmanager
def _submission_lock(ledger: Ledger, batch_id: str, *, wait: bool) -> Iterator[bool]:
    """Hold the batch's submission lock for the block (True), or learn that a live
    process holds it (False; with `wait`, wait for it). A session lock, on a connection
    kept for the block: the death of its process releases it."""
    keys = {"space": _LOCK_SPACE, "id": batch_id}
    with ledger.engine.connect() as conn:
        if wait:
            conn.execute(text(f"SET LOCAL lock_timeout = '{WAIT_FOR_CREATOR_S}s'"))
            try:
                conn.execute(text("SELECT pg_advisory_lock(:space, hashtext(:id))"), keys)
            except LedgerError:
                raise ApiError(
                    503, f"batch {batch_id} is still being submitted; try again",
                    code="unavailable", headers={"Retry-After": "5"},
                ) from None  # fmt: skip
            conn.commit()
            got = True
        else:
            got = bool(conn.execute(
                text("SELECT pg_try_advisory_lock(:space, hashtext(:id))"), keys
            ).scalar_one())  # fmt: skip
            conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:space, hashtext(:id))"), keys)
                conn.commit()
