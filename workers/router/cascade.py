"""`tierfleet triage eval --ladder a,b,c`: the cascade replayed on labelled rows, as
production runs it.

Each row is `{"prompt": str, "feature": str, "ok": {rung: bool, ...}, "cost_usd": {rung:
number, ...}}`, with an entry for every rung of the ladder (others are ignored), in a JSONL
file or a JSON array. A row starts where the router says, climbs while the rung's answer is
not ok, and pays each rung it tried; the top rung's answer is final, ok or not. Offline,
the router decides from the prior and an empty memory; with `online`, rows are replayed in
order and the router learns only what the fleet would observe: each answer on a rung below
the top, and, when the top failed too, the take-back of the escalations below it.

Beside the router, the same rows all on the top rung, and always started on the bottom
(climbing as the router's rows do); savings are against all-top.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierfleet.errors import InvalidEnvelope
from workers.router.memory import LocalMemory, Outcome
from workers.router.router import LearnedRouter


@dataclass(frozen=True, slots=True)
class LadderRow:
    prompt: str
    feature: str
    ok: dict[str, bool]
    cost_usd: dict[str, float]


def read_records(path: Path) -> list[tuple[str, Any]]:
    """(where, value) of every row of a JSONL file or a JSON array; `where` names the line
    (or the array's item)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidEnvelope(f"{path}: {exc.strerror or exc}") from None
    if raw.lstrip()[:1] == b"[":
        try:
            items = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidEnvelope(f"{path}: not a JSON array ({exc})") from None
        records = [(f"{path}: item {i}", item) for i, item in enumerate(items, start=1)]
    else:
        records = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                records.append((where, json.loads(line)))
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidEnvelope(f"{where}: not JSON ({exc})") from None
    if not records:
        raise InvalidEnvelope(f"{path}: no rows")
    return records


def is_ladder_row(value: Any) -> bool:
    return isinstance(value, dict) and "ok" in value


def ladder_rows(records: list[tuple[str, Any]], ladder: Sequence[str]) -> list[LadderRow]:
    return [_row(where, doc, ladder) for where, doc in records]


def _row(where: str, doc: Any, ladder: Sequence[str]) -> LadderRow:
    if not isinstance(doc, dict):
        raise InvalidEnvelope(f"{where}: a row is a JSON object")
    for name in ("prompt", "feature"):
        if not isinstance(doc.get(name), str):
            what = "required field is missing" if name not in doc else "must be a str"
            raise InvalidEnvelope(f"{where}, field {name!r}: {what}")
    ok: dict[str, bool] = {}
    cost: dict[str, float] = {}
    for name in ("ok", "cost_usd"):
        if not isinstance(doc.get(name), dict):
            what = "required field is missing" if name not in doc else "must be an object"
            raise InvalidEnvelope(f"{where}, field {name!r}: {what} ({{rung: value}})")
    for rung in ladder:
        value = doc["ok"].get(rung)
        if not isinstance(value, bool):
            what = "missing" if rung not in doc["ok"] else "must be a bool"
            raise InvalidEnvelope(f"{where}, field 'ok.{rung}': {what}")
        ok[rung] = value
        price = doc["cost_usd"].get(rung)
        if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
            what = "missing" if rung not in doc["cost_usd"] else "must be a number >= 0 (USD)"
            raise InvalidEnvelope(f"{where}, field 'cost_usd.{rung}': {what}")
        cost[rung] = float(price)
    return LadderRow(doc["prompt"], doc["feature"], ok, cost)


@dataclass
class Policy:
    """One way of running the rows: the shares started on each rung, the share answered
    ok, the cost."""

    started: dict[str, float]
    quality: float
    cost_usd: float

    def line(self, name: str, rows: int) -> str:
        return (
            f"{name}: quality {self.quality:.3f}, cost ${self.cost_usd:,.4f} "
            f"(${self.cost_usd / rows:.6f} per row)"
        )


@dataclass
class LadderSummary:
    ladder: list[str]
    rows: int
    online: bool
    scorer: str
    router: Policy
    all_top: Policy
    always_bottom: Policy
    finished: dict[str, float] = field(default_factory=dict)  # router: the answering rung

    @property
    def savings_pct(self) -> float:
        return _savings(self.router.cost_usd, self.all_top.cost_usd)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if not isinstance(v, Policy)}
        for name in ("router", "all_top", "always_bottom"):
            out[name] = dict(getattr(self, name).__dict__)
        out["savings_pct"] = round(self.savings_pct, 2)
        return out

    def lines(self) -> Iterator[str]:
        yield f"scorer: {self.scorer}{' (online)' if self.online else ''}"
        yield f"ladder: {' -> '.join(self.ladder)}; rows: {self.rows:,}"
        yield "started on: " + _shares(self.router.started)
        yield "answered on: " + _shares(self.finished)
        yield self.router.line("router", self.rows)
        yield self.all_top.line(f"all-top ({self.ladder[-1]})", self.rows)
        bottom = self.always_bottom
        saved = _savings(bottom.cost_usd, self.all_top.cost_usd)
        line = bottom.line(f"always-bottom ({self.ladder[0]} first)", self.rows)
        yield f"{line}, savings {saved:.1f}%"
        yield f"savings_pct: {self.savings_pct:.1f}"


def _savings(cost: float, against: float) -> float:
    return 100.0 * (1.0 - cost / against) if against > 0 else 0.0


def _shares(counts: dict[str, float]) -> str:
    return ", ".join(f"{rung} {share:.1%}" for rung, share in counts.items())


def climb(row: LadderRow, ladder: Sequence[str], start: int) -> tuple[int, float]:
    """(the rung that answered, the cost of every rung tried) from `start`."""
    cost = 0.0
    rung = start
    while True:
        cost += row.cost_usd[ladder[rung]]
        if row.ok[ladder[rung]] or rung == len(ladder) - 1:
            return rung, cost
        rung += 1


def replay(
    rows: list[LadderRow],
    ladder: Sequence[str],
    router: LearnedRouter | None = None,
    *,
    online: bool = False,
    progress: Callable[[int], None] = lambda n: None,
) -> LadderSummary:
    if len(ladder) < 2:
        raise ValueError("a ladder has at least two rungs")
    router = router or LearnedRouter(memory=LocalMemory())
    started = dict.fromkeys(ladder, 0)
    finished = dict.fromkeys(ladder, 0)
    ok = cost = 0.0
    for i, row in enumerate(rows):
        # offline, a decision teaches nothing, so its triage count is not kept either
        a = router.assess_text(row.prompt, row.feature, f"eval/{i}", ladder, record=online)
        start = list(ladder).index(a.tier)
        answered, paid = climb(row, ladder, start)
        started[a.tier] += 1
        finished[ladder[answered]] += 1
        ok += row.ok[ladder[answered]]
        cost += paid
        if online:
            _learn(router, row, ladder, start, answered, a.score)
        if i % 256 == 0:
            progress(i)
    progress(len(rows))
    n = len(rows)
    return LadderSummary(
        ladder=list(ladder),
        rows=n,
        online=online,
        scorer=router.version,
        router=Policy(_frac(started, n), ok / n, cost),
        all_top=_fixed(rows, ladder, len(ladder) - 1),
        always_bottom=_fixed(rows, ladder, 0),
        finished=_frac(finished, n),
    )


def _learn(
    router: LearnedRouter,
    row: LadderRow,
    ladder: Sequence[str],
    start: int,
    answered: int,
    score: float,
) -> None:
    """What the fleet would observe of the row, as the tier workers teach it."""
    prior = router.prior.score(row.prompt)
    top = len(ladder) - 1
    for rung in range(start, min(answered + 1, top)):
        placed = score if rung == start else prior
        escalated = not row.ok[ladder[rung]]
        router.memory.learn(Outcome.answer(row.feature, prior, placed, escalated, ladder[rung]))
    if answered == top and not row.ok[ladder[top]]:
        for rung in range(start, top):
            placed = score if rung == start else prior
            router.memory.learn(Outcome.taken_back(row.feature, prior, placed, ladder[rung]))


def _fixed(rows: list[LadderRow], ladder: Sequence[str], start: int) -> Policy:
    ok = cost = 0.0
    for row in rows:
        answered, paid = climb(row, ladder, start)
        ok += row.ok[ladder[answered]]
        cost += paid
    started = {rung: float(i == start) for i, rung in enumerate(ladder)}
    return Policy(started, ok / len(rows), cost)


def _frac(counts: dict[str, int], n: int) -> dict[str, float]:
    return {k: v / n for k, v in counts.items()}
