"""`tierfleet triage eval`: the router on labelled rows, with the routing literature's
metrics (see `metrics.py`).

Each row is `{"prompt": str, "feature": str, "small_ok": bool, "large_ok": bool}`, with
optional `small_cost` and `large_cost` (USD per call). Offline, every row is scored by the
prior and the feature memory as they stand (empty: the prior alone). With `online`, rows
are replayed in order as production would see them: each is triaged, and only a row sent
to the small tier teaches the router, with what the fleet would observe: the small
model's outcome and, when that failed, the frontier's after the escalation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierfleet.errors import InvalidEnvelope
from workers.router.memory import LocalMemory, Outcome
from workers.router.metrics import auroc, gap_curve
from workers.router.router import LearnedRouter


@dataclass(frozen=True, slots=True)
class EvalRow:
    prompt: str
    feature: str
    small_ok: bool
    large_ok: bool
    small_cost: float | None = None
    large_cost: float | None = None


def read_rows(path: Path) -> list[EvalRow]:
    """The rows of a JSONL file; a bad line is an error naming the file, line and field."""
    rows: list[EvalRow] = []
    try:
        f = path.open("rb")
    except OSError as exc:
        raise InvalidEnvelope(f"{path}: {exc.strerror or exc}") from None
    with f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            rows.append(_row(path, number, raw))
    if not rows:
        raise InvalidEnvelope(f"{path}: no rows")
    return rows


def _row(path: Path, number: int, raw: bytes) -> EvalRow:
    where = f"{path}: line {number}"
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEnvelope(f"{where}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidEnvelope(f"{where}: a row is a JSON object")
    out: dict[str, Any] = {}
    for name, kind in (("prompt", str), ("feature", str), ("small_ok", bool), ("large_ok", bool)):
        if name not in doc:
            raise InvalidEnvelope(f"{where}, field {name!r}: required field is missing")
        if not isinstance(doc[name], kind):
            raise InvalidEnvelope(f"{where}, field {name!r}: must be a {kind.__name__}")
        out[name] = doc[name]
    for name in ("small_cost", "large_cost"):
        value = doc.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise InvalidEnvelope(f"{where}, field {name!r}: must be a number >= 0 (USD)")
        out[name] = float(value)
    return EvalRow(**out)


@dataclass
class Summary:
    rows: int
    needs_frontier: int
    small_suffices: int
    neither: int
    quality_small: float
    quality_large: float
    auroc: float | None
    apgr: float
    cpt50: float | None
    cpt80: float | None
    online: bool
    sent_small: int = 0  # online: rows the router sent to the small tier, and learnt from
    cost: dict[str, float] = field(default_factory=dict)
    scorer: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def lines(self) -> Iterator[str]:
        yield f"scorer: {self.scorer}{' (online)' if self.online else ''}"
        yield (
            f"rows: {self.rows:,} (needs the frontier {self.needs_frontier:,}, small model "
            f"suffices {self.small_suffices:,}, neither {self.neither:,})"
        )
        yield (
            f"quality: small model alone {self.quality_small:.3f}, frontier alone "
            f"{self.quality_large:.3f}"
        )
        if self.online:
            yield f"replay: {self.sent_small:,} rows sent to the small tier and learnt from"
        for name, value in self.cost.items():
            yield f"{name}: {value:.6f}"
        yield "auroc: " + (
            "n/a (needs both kinds of rows)" if self.auroc is None else f"{self.auroc:.3f}"
        )
        yield "cpt(50%): " + _share(self.cpt50)
        yield "cpt(80%): " + _share(self.cpt80)
        yield f"apgr: {self.apgr:.3f}"


def _share(value: float | None) -> str:
    return "never reached" if value is None else f"{value:.1%} of rows to the frontier"


def evaluate(
    rows: list[EvalRow],
    router: LearnedRouter | None = None,
    *,
    online: bool = False,
    progress: Callable[[int], None] = lambda n: None,
) -> Summary:
    router = router or LearnedRouter(memory=LocalMemory())
    scores: list[float] = []
    sent_small = 0
    for i, row in enumerate(rows):
        key = f"eval/{i}"
        if not online:
            scores.append(router.score_text(row.prompt, row.feature)[1])
        else:
            a = router.assess_text(row.prompt, row.feature, key)
            scores.append(a.score)
            if a.score < a.threshold or a.explore:
                sent_small += 1
                _learn(router, row, a.score)
        if i % 256 == 0:
            progress(i)
    progress(len(rows))
    return _summary(router, rows, scores, online, sent_small)


def _learn(router: LearnedRouter, row: EvalRow, score: float) -> None:
    prior = router.prior.score(row.prompt)
    router.memory.learn(Outcome.answer(row.feature, prior, score, not row.small_ok))
    if not row.small_ok and not row.large_ok:
        router.memory.learn(Outcome.taken_back(row.feature, prior, score))


def _summary(
    router: LearnedRouter,
    rows: list[EvalRow],
    scores: list[float],
    online: bool,
    sent_small: int,
) -> Summary:
    small = [r.small_ok for r in rows]
    large = [r.large_ok for r in rows]
    curve = gap_curve(scores, small, large)
    pairs = [
        (s, not r.small_ok) for s, r in zip(scores, rows, strict=True) if r.small_ok or r.large_ok
    ]
    needs = sum(1 for r in rows if not r.small_ok and r.large_ok)
    ok = sum(small)
    try:
        area_under = auroc([s for s, _ in pairs], [y for _, y in pairs])
    except ValueError:
        area_under = None
    out = Summary(
        rows=len(rows),
        needs_frontier=needs,
        small_suffices=ok,
        neither=len(rows) - needs - ok,
        quality_small=sum(small) / len(rows),
        quality_large=sum(large) / len(rows),
        auroc=area_under,
        apgr=curve.area(),
        cpt50=curve.share_for(0.5),
        cpt80=curve.share_for(0.8),
        online=online,
        sent_small=sent_small,
        scorer=router.version,
    )
    if all(r.small_cost is not None and r.large_cost is not None for r in rows):
        out.cost = _costs(rows, scores, out.cpt80)
    return out


def _costs(rows: list[EvalRow], scores: list[float], share: float | None) -> dict[str, float]:
    """Cost per row at CPT(80%) in the fleet's cascade (a small-tier failure escalates and
    pays both), against sending every row to the frontier."""
    n = len(rows)
    k = round((share if share is not None else 1.0) * n)
    top = set(sorted(range(n), key=lambda i: -scores[i])[:k])
    routed = 0.0
    for i, r in enumerate(rows):
        assert r.small_cost is not None and r.large_cost is not None
        if i in top:
            routed += r.large_cost
        else:
            routed += r.small_cost + (0.0 if r.small_ok else r.large_cost)
    frontier = sum(r.large_cost or 0.0 for r in rows)
    return {"cost_per_row_at_cpt80_usd": routed / n, "cost_per_row_all_frontier_usd": frontier / n}
