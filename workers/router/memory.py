"""What the fleet has learnt about each feature's prompts, shared by every worker.

Per feature: how many small-tier outcomes were seen (`n`), how many of them needed the
frontier (`positives`: the small model's answer failed and the frontier's did not), the
sum of the prior's scores on those prompts (`prior_sum`, so that the feature's offset from
the prior can be measured), and three histograms over the routing score (50 bins): jobs
triaged, small-tier outcomes seen, and escalations among them. The thresholds are
calibrated from the histograms.

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
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

BINS = 50
PREFIX = "tierfleet:router:"
_STATS = PREFIX + "stats"  # field "<feature>\x1f<name>", name: n | positives | prior_sum
_HIST = PREFIX + "hist"  # field "<feature>\x1f<kind>\x1f<bin>", kind: t | o | e
_SEP = "\x1f"


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
    """One small-tier outcome (or its correction) to learn from."""

    feature: str
    prior: float  # the prior's score of the prompt
    score: float  # the routing score the job was triaged with
    positive: float  # +1: needed the frontier; -1: a correction (the frontier failed too)
    escalated: bool  # the small model's answer failed
    observed: bool = True  # False for a correction: the outcome was counted already

    @classmethod
    def small_tier(cls, feature: str, prior: float, score: float, escalated: bool) -> Outcome:
        """A small-tier answer, valid or not. An escalation counts as needing the frontier
        until the frontier fails too (`taken_back`)."""
        return cls(feature, prior, score, float(escalated), escalated)

    @classmethod
    def taken_back(cls, feature: str, prior: float, score: float) -> Outcome:
        """The frontier failed a job the small model failed: it did not need the frontier
        (neither could answer), so its escalation no longer counts as a positive."""
        return cls(feature, prior, score, -1.0, True, observed=False)


class Memory(Protocol):
    def stats(self, feature: str) -> FeatureStats: ...

    def triaged(self, feature: str, score: float) -> None: ...

    def learn(self, outcome: Outcome) -> None: ...

    def reset(self, stats: dict[str, FeatureStats]) -> None: ...


class LocalMemory:
    def __init__(self) -> None:
        self._stats: dict[str, FeatureStats] = defaultdict(FeatureStats)
        self._lock = threading.Lock()

    def stats(self, feature: str) -> FeatureStats:
        return self._stats.get(feature) or FeatureStats()

    def triaged(self, feature: str, score: float) -> None:
        with self._lock:
            self._stats[feature].triaged[bin_of(score)] += 1

    def learn(self, outcome: Outcome) -> None:
        with self._lock:
            _apply(self._stats[outcome.feature], outcome)

    def reset(self, stats: dict[str, FeatureStats]) -> None:
        with self._lock:
            self._stats = defaultdict(FeatureStats, stats)

    def snapshot(self) -> dict[str, FeatureStats]:
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
    labels, never a job."""

    def __init__(self, client: redis.Redis, refresh_s: float = 2.0) -> None:
        self.client = client
        self.refresh_s = refresh_s
        self._snapshot: dict[str, FeatureStats] = {}
        self._loaded_at = -1e9
        self._pending: dict[tuple[str, str], float] = defaultdict(float)  # (hash, field)
        self._flushed_at = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, refresh_s: float = 2.0) -> RedisMemory:
        return cls(redis.Redis.from_url(url, socket_timeout=5), refresh_s)

    def stats(self, feature: str) -> FeatureStats:
        if time.monotonic() - self._loaded_at > self.refresh_s:
            self._refresh()
        return self._snapshot.get(feature) or FeatureStats()

    def triaged(self, feature: str, score: float) -> None:
        with self._lock:
            self._pending[(_HIST, f"{feature}{_SEP}t{_SEP}{bin_of(score)}")] += 1

    def learn(self, outcome: Outcome) -> None:
        f, b = outcome.feature, bin_of(outcome.score)
        with self._lock:
            pending = self._pending
            if outcome.positive:
                pending[(_STATS, f"{f}{_SEP}positives")] += outcome.positive
            if outcome.observed:
                pending[(_STATS, f"{f}{_SEP}n")] += 1
                pending[(_STATS, f"{f}{_SEP}prior_sum")] += outcome.prior
                pending[(_HIST, f"{f}{_SEP}o{_SEP}{b}")] += 1
                if outcome.escalated:
                    pending[(_HIST, f"{f}{_SEP}e{_SEP}{b}")] += 1
        if time.monotonic() - self._flushed_at > self.refresh_s:
            self.flush()

    def reset(self, stats: dict[str, FeatureStats]) -> None:
        """Replace everything (`tierfleet triage retrain`), in one transaction."""
        flat: dict[Any, float] = {}
        hist: dict[Any, float] = {}
        for f, s in stats.items():
            flat[f"{f}{_SEP}n"] = s.n
            flat[f"{f}{_SEP}positives"] = s.positives
            flat[f"{f}{_SEP}prior_sum"] = s.prior_sum
            for kind, values in (("t", s.triaged), ("o", s.observed), ("e", s.escalated)):
                for b, v in enumerate(values):
                    if v:
                        hist[f"{f}{_SEP}{kind}{_SEP}{b}"] = v
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(_STATS, _HIST)
            if flat:
                pipe.hset(_STATS, mapping=flat)
            if hist:
                pipe.hset(_HIST, mapping=hist)
            pipe.execute()
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
                    if name == _HIST:  # counts
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
        try:
            self.flush()
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hgetall(_STATS)
                pipe.hgetall(_HIST)
                raw_stats, raw_hist = pipe.execute()
        except redis.RedisError:
            return  # routing goes on with the last snapshot (or the prior alone)
        snap: dict[str, FeatureStats] = defaultdict(FeatureStats)
        for key, value in raw_stats.items():
            f, _, name = key.decode().rpartition(_SEP)
            setattr(snap[f], name, float(value))
        for key, value in raw_hist.items():
            f, kind, b = key.decode().rsplit(_SEP, 2)
            snap[f].add_bin(kind, int(b), float(value))
        self._snapshot = dict(snap)

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.flush()
        self.client.close()
