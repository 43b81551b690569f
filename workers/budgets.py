"""Daily budgets: spend caps per UTC day, for a tier of the ladder (`tier:NAME`), for the
top rung (`frontier`: the default fleet's top tier's name, kept for any ladder) and per
feature (`feature:NAME`).

An attempt checks its scopes' spend today before it calls, on the tiers a cap can hold:
a tier's cap holds that tier's attempts, the top rung's (`frontier`) the top rung's, and
a feature's cap holds the feature's attempts on every tier but a self-hosted (`vllm`)
one, whose GPU is paid for either way (in the default fleet: on the frontier alone).
When a cap is reached the job waits, `triaged` with its `hold_reason`, and its message
comes back every `TIERFLEET_BUDGET_RECHECK_S` (or at the next day, if sooner) until the
day turns or the cap is raised. Every attempt's cost is added to its capped scopes (a
feature's spend on every tier counts) in the transaction that books it, so the check is
as current as the ledger: calls already in flight when a cap is crossed finish and are
billed, and the overshoot is at most one call per worker thread. Caps live in Postgres
(`tierfleet budgets set`), read by each worker every few seconds; with none set,
nothing is read or written per attempt.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from tierfleet import constants as C
from tierfleet.fleet import Fleet
from tierfleet.models import BudgetSpend
from workers import sql

FRONTIER_SCOPE = "frontier"
FEATURE_PREFIX = "feature:"
TIER_PREFIX = "tier:"


def feature_scope(feature: str) -> str:
    return FEATURE_PREFIX + feature


def tier_scope(tier: str) -> str:
    return TIER_PREFIX + tier


def describe(scope: str) -> str:
    """A scope as a reason names it: `the frontier`, `tier 'sonnet'`, `feature 'tags'`."""
    if scope == FRONTIER_SCOPE:
        return "the frontier"
    if scope.startswith(TIER_PREFIX):
        return f"tier {scope[len(TIER_PREFIX) :]!r}"
    return f"feature {scope[len(FEATURE_PREFIX) :]!r}"


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def seconds_to_next_day(now: dt.datetime | None = None) -> float:
    now = now or dt.datetime.now(dt.UTC)
    tomorrow = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    return max(1.0, (tomorrow - now).total_seconds())


@dataclass(frozen=True, slots=True)
class Hold:
    reason: str
    delay_s: float


class Budgets:
    """The caps, cached per process for `refresh_s`. `fleet` says which tier is the top
    rung and which are self-hosted (without one: the default fleet's names, `frontier`
    on top and `slm` self-hosted)."""

    def __init__(
        self, refresh_s: float = 10.0, recheck_s: float = 60.0, fleet: Fleet | None = None
    ) -> None:
        self.refresh_s = refresh_s
        self.recheck_s = recheck_s
        self.top = fleet.top.name if fleet else C.TIER_LADDER[-1]
        self.self_hosted = (
            frozenset(t.name for t in fleet if t.backend == "vllm")
            if fleet
            else frozenset(C.TIER_LADDER[:-1])
        )
        self._caps: dict[str, Decimal] = {}
        self._loaded_at = -1e9
        self._lock = threading.Lock()

    def caps(self, conn: Connection) -> Mapping[str, Decimal]:
        if time.monotonic() - self._loaded_at > self.refresh_s:
            caps = {scope: Decimal(cap) for scope, cap in conn.execute(sql.BUDGET_CAPS)}
            with self._lock:
                self._caps, self._loaded_at = caps, time.monotonic()
        return self._caps

    def scopes(self, conn: Connection, feature: str, tier: str) -> list[str]:
        """The capped scopes an attempt of `feature` on `tier` spends from."""
        caps = self.caps(conn)
        if not caps:
            return []
        out = [s for s in (feature_scope(feature), tier_scope(tier)) if s in caps]
        if tier == self.top and FRONTIER_SCOPE in caps:
            out.append(FRONTIER_SCOPE)
        return out

    def _holding(self, scopes: list[str], tier: str) -> list[str]:
        """Of an attempt's scopes, those that may hold it."""
        if tier not in self.self_hosted:
            return scopes
        return [s for s in scopes if not s.startswith(FEATURE_PREFIX)]

    def may_hold(self, conn: Connection, tier: str) -> bool:
        """Could `hold` stop an attempt on `tier`? (Not while no cap is set.)"""
        caps = self.caps(conn)
        if not caps:
            return False
        if tier not in self.self_hosted and any(s.startswith(FEATURE_PREFIX) for s in caps):
            return True
        return tier_scope(tier) in caps or (tier == self.top and FRONTIER_SCOPE in caps)

    def hold(self, conn: Connection, feature: str, tier: str) -> Hold | None:
        """None when an attempt of `feature` on `tier` may spend; else why it waits."""
        scopes = self._holding(self.scopes(conn, feature, tier), tier)
        if not scopes:
            return None
        caps = self.caps(conn)
        spent = dict(conn.execute(sql.BUDGET_SPEND, {"p_day": today(), "p_scopes": scopes}).all())
        for scope in scopes:
            used = Decimal(spent.get(scope, 0))
            if used >= caps[scope]:
                reason = (
                    f"waiting: the daily budget of {describe(scope)} is spent (${used:.4f} of "
                    f"${caps[scope]:.4f} today); it resumes at 00:00 UTC or when the cap is "
                    f"raised (tierfleet budgets set {scope} USD)"
                )
                return Hold(reason, min(self.recheck_s, seconds_to_next_day()))
        return None

    def add(self, conn: Connection, scopes: list[str], cost: Decimal) -> None:
        if not scopes or not cost:
            return
        day = today()
        ins = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(
            BudgetSpend
        )
        upsert = ins.on_conflict_do_update(
            index_elements=["scope", "day"],
            set_={"spent_usd": BudgetSpend.spent_usd + ins.excluded.spent_usd},
        )
        conn.execute(upsert, [{"scope": s, "day": day, "spent_usd": cost} for s in scopes])
