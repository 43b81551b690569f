"""What the fleet has learnt about each feature's prompts, shared by every worker.

Per (feature, tier), for every rung of the ladder but the top: how many outcomes were seen
on that rung (`n`), how many of them needed a rung above (`positives`: the rung's answer
failed and the top's did not), the sum of the prior's scores on those prompts
(`prior_sum`, so that the offset from the prior can be measured), and three histograms
over the routing score (50 bins): jobs triaged on the rung (whose start the rung's score
decided), outcomes seen on it, and escalations among them. The thresholds are calibrated
from the histograms.

Redis keys: the tier `slm` (the bottom rung of the default fleet) keeps the hashes of
earlier releases, `tierfleet:router:stats` and `tierfleet:router:hist`; any other tier has
`tierfleet:router:<tier>:stats` and `tierfleet:router:<tier>:hist`, with the same fields.

`RedisMemory` keeps it in Redis hashes, updated with atomic increments (any number of
workers, no lost update) and read by triage as a snapshot refreshed every few seconds;
triage's own counts are buffered and flushed with the refresh, so a decision costs no
round trip. `LocalMemory` keeps the same in the process (evaluation, the demo).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from tierfleet import constants as C

BINS = 50
DEFAULT_TIER = C.TIER_LADDER[0]  # the tier of a call that names none: the default bottom
PREFIX = "tierfleet:router:"
_STATS = PREFIX + "stats"  # field "<feature>\x1f<name>", name: n | positives | prior_sum
_HIST = PREFIX + "hist"  # field "<feature>\x1f<kind>\x1f<bin>", kind: t | o | e
_SEP = "\x1f"


def redis_keys(tier: str) -> tuple[str, str]:
    """The (stats, histograms) hashes of a tier's memory."""
    if tier == DEFAULT_TIER:
        return _STATS, _HIST
    return f"{PREFIX}{tier}:stats", f"{PREFIX}{tier}:hist"


def bin_of(score: float) -> int:
    return min(BINS - 1, max(0, int(score * BINS)))


@dataclass
class FeatureStats:
    n: float = 0.0
    positives: float = 0.0
    prior_sum: float = 0.0
    triaged: list[float] = field(default_factory=lambda: [0.0] * BINS)
    observed: list[float] = field(default_factory=lambda: [0.0] * BINS)
    escalated: list[float] = field(default_factory=lambda: [0.0] * BINS)

    def add_bin(self, kind: str, b: int, value: float) -> None:
        {"t": self.triaged, "o": self.observed, "e": self.escalated}[kind][b] += value


@dataclass(frozen=True, slots=True)
class Outcome:
    """One outcome on a rung below the top (or its correction) to learn from."""

    feature: str
    prior: float  # the prior's score of the prompt
    score: float  # the routing score that places it in the histograms
    positive: float  # +1: needed a rung above; -1: a correction (the top failed too)
    escalated: bool  # the rung's answer failed
    observed: bool = True  # False for a correction: the outcome was counted already
    tier: str = DEFAULT_TIER

    @classmethod
    def answer(
        cls, feature: str, prior: float, score: float, escalated: bool, tier: str = DEFAULT_TIER
    ) -> Outcome:
        """A rung's answer, valid or not. An escalation counts as needing a rung above
        until the top fails too (`taken_back`)."""
        return cls(feature, prior, score, float(escalated), escalated, tier=tier)

    @classmethod
    def taken_back(
        cls, feature: str, prior: float, score: float, tier: str = DEFAULT_TIER
    ) -> Outcome:
        """The top failed a job that `tier` had escalated: it did not need a rung above
        (none could answer), so its escalation no longer counts as a positive."""
        return cls(feature, prior, score, -1.0, True, observed=False, tier=tier)


Key = tuple[str, str]  # (feature, tier)


class Memory(Protocol):
    def stats(self, feature: str, tier: str = DEFAULT_TIER) -> FeatureStats: ...

    def triaged(self, feature: str, score: float, tier: str = DEFAULT_TIER) -> None: ...

    def learn(self, outcome: Outcome) -> None: ...

    def reset(self, stats: Mapping[Key, FeatureStats]) -> None: ...


class LocalMemory:
    def __init__(self) -> None:
        self._stats: dict[Key, FeatureStats] = defaultdict(FeatureStats)
        self._lock = threading.Lock()

    def stats(self, feature: str, tier: str = DEFAULT_TIER) -> FeatureStats:
        return self._stats.get((feature, tier)) or FeatureStats()

    def triaged(self, feature: str, score: float, tier: str = DEFAULT_TIER) -> None:
        with self._lock:
            self._stats[(feature, tier)].triaged[bin_of(score)] += 1

    def learn(self, outcome: Outcome) -> None:
        with self._lock:
            _apply(self._stats[(outcome.feature, outcome.tier)], outcome)

    def reset(self, stats: Mapping[Key, FeatureStats]) -> None:
        with self._lock:
            self._stats = defaultdict(FeatureStats, stats)

    def snapshot(self) -> dict[Key, FeatureStats]:
        return dict(self._stats)


def _apply(s: FeatureStats, o: Outcome) -> None:
    b = bin_of(o.score)
    s.positives += o.positive
    if o.observed:
        s.n += 1
        s.prior_sum += o.prior
        s.observed[b] += 1
        if o.escalated:
            s.escalated[b] += 1


class RedisMemory:
    """The shared memory in Redis. `stats` serves a snapshot at most `refresh_s` old;
    what a worker triages and learns is added up here and sent as one pipeline about as
    often (and on close): a worker lost without closing loses at most that much of its
    labels, never a job. The snapshot holds the tiers asked about so far (a tier asked
    about for the first time is read at once)."""

    def __init__(self, client: redis.Redis, refresh_s: float = 2.0) -> None:
        self.client = client
        self.refresh_s = refresh_s
        self._tiers: set[str] = {DEFAULT_TIER}
        self._snapshot: dict[Key, FeatureStats] = {}
        self._loaded_at = -1e9
        self._pending: dict[tuple[str, str], float] = defaultdict(float)  # (hash, field)
        self._flushed_at = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, refresh_s: float = 2.0) -> RedisMemory:
        return cls(redis.Redis.from_url(url, socket_timeout=5), refresh_s)

    def stats(self, feature: str, tier: str = DEFAULT_TIER) -> FeatureStats:
        if tier not in self._tiers:
            self._tiers.add(tier)
            self._loaded_at = -1e9
        if time.monotonic() - self._loaded_at > self.refresh_s:
            self._refresh()
        return self._snapshot.get((feature, tier)) or FeatureStats()

    def triaged(self, feature: str, score: float, tier: str = DEFAULT_TIER) -> None:
        hist = redis_keys(tier)[1]
        with self._lock:
            self._pending[(hist, f"{feature}{_SEP}t{_SEP}{bin_of(score)}")] += 1

    def learn(self, outcome: Outcome) -> None:
        f, b = outcome.feature, bin_of(outcome.score)
        stats, hist = redis_keys(outcome.tier)
        with self._lock:
            pending = self._pending
            if outcome.positive:
                pending[(stats, f"{f}{_SEP}positives")] += outcome.positive
            if outcome.observed:
                pending[(stats, f"{f}{_SEP}n")] += 1
                pending[(stats, f"{f}{_SEP}prior_sum")] += outcome.prior
                pending[(hist, f"{f}{_SEP}o{_SEP}{b}")] += 1
                if outcome.escalated:
                    pending[(hist, f"{f}{_SEP}e{_SEP}{b}")] += 1
        if time.monotonic() - self._flushed_at > self.refresh_s:
            self.flush()

    def reset(self, stats: Mapping[Key, FeatureStats]) -> None:
        """Replace everything under the router's prefix (`tierfleet triage retrain`), in
        one transaction."""
        values: dict[str, dict[Any, float]] = defaultdict(dict)
        for (f, tier), s in stats.items():
            flat, hist = redis_keys(tier)
            values[flat][f"{f}{_SEP}n"] = s.n
            values[flat][f"{f}{_SEP}positives"] = s.positives
            values[flat][f"{f}{_SEP}prior_sum"] = s.prior_sum
            for kind, counts in (("t", s.triaged), ("o", s.observed), ("e", s.escalated)):
                for b, v in enumerate(counts):
                    if v:
                        values[hist][f"{f}{_SEP}{kind}{_SEP}{b}"] = v
        old = list(self.client.scan_iter(match=PREFIX + "*", count=1000))
        with self.client.pipeline(transaction=True) as pipe:
            if old:
                pipe.delete(*old)
            for name, mapping in values.items():
                if mapping:
                    pipe.hset(name, mapping=mapping)
            pipe.execute()
        self._tiers.update(tier for _, tier in stats)
        self._loaded_at = -1e9

    def flush(self) -> None:
        """Send what was triaged and learnt since the last flush (kept for the next one
        when Redis does not answer; the error is raised)."""
        with self._lock:
            pending, self._pending = self._pending, defaultdict(float)
            self._flushed_at = time.monotonic()
        if not pending:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for (name, field), n in pending.items():
                    if name.endswith(":hist"):  # counts
                        pipe.hincrby(name, field, round(n))
                    else:
                        pipe.hincrbyfloat(name, field, n)
                pipe.execute()
        except redis.RedisError:
            with self._lock:  # keep them for the next flush
                for key, n in pending.items():
                    self._pending[key] += n
            raise

    def _refresh(self) -> None:
        self._loaded_at = time.monotonic()
        tiers = sorted(self._tiers)
        try:
            self.flush()
            with self.client.pipeline(transaction=False) as pipe:
                for tier in tiers:
                    for name in redis_keys(tier):
                        pipe.hgetall(name)
                raw = pipe.execute()
        except redis.RedisError:
            return  # routing goes on with the last snapshot (or the prior alone)
        snap: dict[Key, FeatureStats] = defaultdict(FeatureStats)
        for i, tier in enumerate(tiers):
            raw_stats, raw_hist = raw[2 * i], raw[2 * i + 1]
            for key, value in raw_stats.items():
                f, _, name = key.decode().rpartition(_SEP)
                setattr(snap[(f, tier)], name, float(value))
            for key, value in raw_hist.items():
                f, kind, b = key.decode().rsplit(_SEP, 2)
                snap[(f, tier)].add_bin(kind, int(b), float(value))
        self._snapshot = dict(snap)

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.flush()
        self.client.close()
