"""Routing metrics, as the routing literature (RouteLLM) defines them.

A router ranks prompts by score; sending the top `k` of `n` to the frontier model and the
rest to the small one gives a quality (the share answered correctly) for each frontier
share `k / n`. With `q_small` and `q_large` the qualities of sending everything to one
model, the performance gap recovered at a share is `(q - q_small) / (q_large - q_small)`.

- APGR: the area under that curve over frontier shares 0..1 (a random router: 0.5).
- CPT(x): the smallest frontier share whose gap recovered reaches x.
- AUROC: how well the score separates prompts that need the frontier (the small model
  fails, the frontier succeeds) from those the small model answers.

Tied scores are sent together by any threshold, so the curve is linear across a tie (the
expectation over any order within it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby, pairwise


@dataclass(frozen=True, slots=True)
class Curve:
    """Frontier share (x) against performance gap recovered (y), from 0 to 1."""

    shares: tuple[float, ...]
    recovered: tuple[float, ...]

    def area(self) -> float:
        pts = list(zip(self.shares, self.recovered, strict=True))
        return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in pairwise(pts))

    def share_for(self, target: float) -> float | None:
        """The smallest frontier share at which the gap recovered reaches `target`
        (linear within a segment); None if it never does."""
        pts = list(zip(self.shares, self.recovered, strict=True))
        if pts and pts[0][1] >= target:
            return pts[0][0]
        for (x0, y0), (x1, y1) in pairwise(pts):
            if y0 < target <= y1:
                return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
        return None


def gap_curve(scores: Sequence[float], small_ok: Sequence[bool], large_ok: Sequence[bool]) -> Curve:
    n = len(scores)
    if not n or not (len(small_ok) == len(large_ok) == n):
        raise ValueError("scores, small_ok and large_ok must be non-empty and of one length")
    q_small = sum(small_ok) / n
    q_large = sum(large_ok) / n
    if q_large <= q_small:
        raise ValueError(
            f"the frontier is no better than the small model on these rows "
            f"({q_large:.3f} <= {q_small:.3f}): there is no gap to recover"
        )
    gap = q_large - q_small
    ranked = sorted(range(n), key=lambda i: -scores[i])
    shares, recovered = [0.0], [0.0]
    sent, gained = 0, 0
    for _, group in groupby(ranked, key=lambda i: scores[i]):
        members = list(group)
        sent += len(members)
        gained += sum(int(large_ok[i]) - int(small_ok[i]) for i in members)
        shares.append(sent / n)
        recovered.append(gained / n / gap)
    return Curve(tuple(shares), tuple(recovered))


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """The probability that a random positive outscores a random negative (ties: half),
    by the rank-sum (Mann-Whitney U) formula."""
    pos = sum(positive)
    neg = len(positive) - pos
    if not pos or not neg:
        raise ValueError("AUROC needs both positive and negative rows")
    ranked = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum = 0.0
    start = 0
    for _, group in groupby(ranked, key=lambda i: scores[i]):
        members = list(group)
        mid_rank = start + (len(members) + 1) / 2  # ranks are 1-based
        rank_sum += mid_rank * sum(1 for i in members if positive[i])
        start += len(members)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)
