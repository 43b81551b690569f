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

from producers import teams
from tierfleet.db import Ledger
from tierfleet.errors import InvalidEnvelope, PermanentError
from tierfleet.models import ApiToken

TOKEN_PREFIX = "tf_"
SHOWN_CHARS = 10  # `tf_` and 7 of the secret
_FEATURE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")  # as the envelope's `feature`


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
    if not teams.valid_team(team):
        raise TokenError(f"team {team!r}: {teams.TEAM_RULE}")
    if feature is not None:
        if not _FEATURE.match(feature):
            raise TokenError(
                f"feature {feature!r}: 1 to 100 letters, digits or _ . / - (starting with a "
                "letter or digit)"
            )
        try:
            teams.team_feature(team, feature)
        except InvalidEnvelope as exc:
            raise TokenError(f"feature {feature!r}: {exc.reason}") from None
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


def unusable(info: TokenInfo) -> str | None:
    """Why a token that passed cannot be used (its team name, from before the rule), or
    None."""
    if teams.valid_team(info.team):
        return None
    return (
        f"the bearer token {info.prefix}… ({info.id}) is for team {info.team!r}, not a team "
        f"name any more ({teams.TEAM_RULE}): make a new token with `tierfleet tokens "
        "create --team NAME` and revoke this one"
    )


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
