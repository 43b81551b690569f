"""A team's own namespace: what a job that enters through a team's API token is named.

Every name such a job carries that the caller chose, or that decides what it spends, is
put in the team's space before it reaches the ledger, on every path (`POST /v1/jobs` and
the lines of a batch file alike):

    idempotency key   `team:{team}:{key}`     (another team's equal key is another job)
    job id            `{team}:{id}`           (only an id the caller gave; generated ids
                                               are random or the server's batch's own)
    feature           `{team}/{feature}`      (budgets, routing memory, targets, reports)

A team name is lowercase letters, digits and `_ . -` (no `:` nor `/`), so no team's
space runs into another's: `a` with key `b:c` and `a:b` with key `c` cannot both exist.
A job id or feature already in the team's own space is kept as it is, so a name the API
showed can be sent back and names the same thing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

from tierfleet.envelope import JobSpec
from tierfleet.errors import InvalidEnvelope

TEAM_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
TEAM_RULE = (
    "1 to 32 lowercase letters, digits or _ . - (starting with a letter or digit; "
    "no ':' or '/', which would let two teams' names meet)"
)
MAX_KEY = 200  # the ledger's columns
MAX_ID = 64
MAX_FEATURE = 100


def valid_team(team: str) -> bool:
    return TEAM_PATTERN.match(team) is not None


def scoped_key(team: str, key: str) -> str:
    """An idempotency key as the ledger keeps it for a team's jobs (within 200
    characters: a longer one by its SHA-256)."""
    scoped = f"team:{team}:{key}"
    if len(scoped) <= MAX_KEY:
        return scoped
    return f"team:{team}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"


def team_id(team: str, job_id: str) -> str:
    """A job id the caller chose, in the team's space; `InvalidEnvelope` (field `id`)
    when that is longer than an id may be."""
    scoped = job_id if job_id.startswith(f"{team}:") else f"{team}:{job_id}"
    if len(scoped) > MAX_ID:
        raise InvalidEnvelope(
            f"as team {team!r}'s, {scoped!r} is over {MAX_ID} characters", field="id"
        )
    return scoped


def team_feature(team: str, feature: str) -> str:
    """The feature a team's job is booked to: `{team}/{feature}`. `InvalidEnvelope`
    (field `feature`) when that is longer than a feature may be. Applying it twice
    changes nothing: `bulk` applies it to every line of a team's batch, defaults too."""
    scoped = feature if feature.startswith(f"{team}/") else f"{team}/{feature}"
    if len(scoped) > MAX_FEATURE:
        raise InvalidEnvelope(
            f"as team {team!r}'s, {scoped!r} is over {MAX_FEATURE} characters", field="feature"
        )
    return scoped


def scope_spec(team: str, spec: JobSpec, *, own_id: bool, own_key: bool) -> JobSpec:
    """`spec` as a job of `team`: its feature always, and its id and idempotency key
    when the caller chose them (`own_id`, `own_key`), in the team's space."""
    return dataclasses.replace(
        spec,
        feature=team_feature(team, spec.feature),
        id=team_id(team, spec.id) if own_id else spec.id,
        idempotency_key=(
            scoped_key(team, spec.idempotency_key)
            if own_key and spec.idempotency_key is not None
            else spec.idempotency_key
        ),
    )
