"""Bearer tokens of the HTTP API: made, listed, revoked, and checked.

A token is `tf_` and 32 random bytes (URL-safe base64); the ledger keeps its SHA-256,
the team and default feature it maps to, and its first characters to tell it apart. The
token itself is shown once, when it is made.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

from limits import parse as parse_rate
from sqlalchemy import select, update

from tierfleet.db import Ledger
from tierfleet.errors import PermanentError
from tierfleet.models import ApiToken

TOKEN_PREFIX = "tf_"
SHOWN_CHARS = 10  # `tf_` and 7 of the secret
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")


class TokenError(PermanentError):
    """A bad team, feature or rate limit for a token, or an unknown token id."""


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: str
    team: str
    feature: str | None
    prefix: str
    rate_limit: str | None
    created_at: dt.datetime
    revoked_at: dt.datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "team": self.team, "feature": self.feature,
            "prefix": self.prefix, "rate_limit": self.rate_limit,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }  # fmt: skip


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def scoped_key(team: str, key: str) -> str:
    """An idempotency key as the ledger keeps it for a team's API jobs: the team's own,
    so that two teams' equal keys are two jobs (within the column's 200 characters)."""
    scoped = f"team:{team}:{key}"
    return scoped if len(scoped) <= 200 else f"team:{team}:sha256:{digest(key)}"


def check_rate_limit(rate: str) -> str:
    """`rate` as the `limits` library reads it ("100/second", "6000 per minute")."""
    try:
        parse_rate(rate)
    except ValueError:
        raise TokenError(
            f"rate limit {rate!r} is not a rate; e.g. '100/second' or '6000/minute'"
        ) from None
    return rate


def create(
    ledger: Ledger, team: str, *, feature: str | None = None, rate_limit: str | None = None
) -> tuple[TokenInfo, str]:
    """A new token for `team`: its record, and the token (shown this once)."""
    for what, value in (("team", team), ("feature", feature)):
        if value is not None and not _NAME.match(value):
            raise TokenError(
                f"{what} {value!r}: 1 to 100 letters, digits or _ . : - (starting with a "
                "letter or digit)"
            )
    if rate_limit is not None:
        check_rate_limit(rate_limit)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        id="tok_" + secrets.token_hex(8), team=team, feature=feature,
        token_sha256=digest(token), prefix=token[:SHOWN_CHARS], rate_limit=rate_limit,
    )  # fmt: skip
    with ledger.session() as s:
        s.add(row)
        s.flush()
        s.refresh(row)
        info = _info(row)
    return info, token


def list_tokens(ledger: Ledger) -> list[TokenInfo]:
    with ledger.session() as s:
        rows = s.execute(select(ApiToken).order_by(ApiToken.team, ApiToken.created_at)).scalars()
        return [_info(r) for r in rows]


def revoke(ledger: Ledger, token_id: str) -> TokenInfo:
    """Revoke a token by id (idempotent); the server refuses it from its next request."""
    with ledger.session() as s:
        s.execute(
            update(ApiToken)
            .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
            .values(revoked_at=dt.datetime.now(dt.UTC))
        )
        row = s.get(ApiToken, token_id)
        if row is None:
            raise TokenError(f"no token with id {token_id!r} (tierfleet tokens list)")
        return _info(row)


def lookup(ledger: Ledger, token: str) -> TokenInfo | None:
    """The token's record (revoked or not), or None for a token never made here."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    with ledger.session() as s:
        row = s.execute(
            select(ApiToken).where(ApiToken.token_sha256 == digest(token))
        ).scalar_one_or_none()
        return None if row is None else _info(row)


def _info(row: ApiToken) -> TokenInfo:
    return TokenInfo(
        row.id, row.team, row.feature, row.prefix, row.rate_limit, row.created_at,
        row.revoked_at,
    )  # fmt: skip
