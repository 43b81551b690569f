"""The generic prior: p(a prompt needs a bigger model than the small tier's), from a
logistic regression over tf-idf word terms and structural measures, trained by
`python -m workers.router.train` on public routing data (see `MODEL_CARD.md`).

The model is a JSON file in the package; scoring is pure Python (a dictionary look-up per
term), so it loads in milliseconds and needs neither scikit-learn nor numpy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from workers.router.features import STRUCTURAL, structural, term_counts

ARTIFACT = Path(__file__).with_name("prior.json")


@dataclass(frozen=True, slots=True)
class Prior:
    version: str
    intercept: float
    terms: dict[str, tuple[float, float]]  # term -> (idf, weight)
    structural_mean: tuple[float, ...]
    structural_scale: tuple[float, ...]
    structural_weights: tuple[float, ...]  # empty: a lexical-only model

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Prior:
        names = tuple(doc.get("structural", {}).get("names", ()))
        if names and names != STRUCTURAL:
            raise ValueError(
                f"prior {doc.get('version')!r} was trained on structural measures {names}, "
                f"this code computes {STRUCTURAL}: retrain it"
            )
        s = doc.get("structural", {})
        return cls(
            version=str(doc["version"]),
            intercept=float(doc["intercept"]),
            terms={t: (float(v[0]), float(v[1])) for t, v in doc["terms"].items()},
            structural_mean=tuple(s.get("mean", ())),
            structural_scale=tuple(s.get("scale", ())),
            structural_weights=tuple(s.get("weights", ())),
        )

    def logit(self, text: str) -> float:
        z = self.intercept
        dot = norm = 0.0
        for term, count in term_counts(text).items():
            known = self.terms.get(term)
            if known is None:
                continue
            idf, weight = known
            x = (1.0 + math.log(count)) * idf
            dot += x * weight
            norm += x * x
        if norm:
            z += dot / math.sqrt(norm)
        if self.structural_weights:
            for value, mean, scale, weight in zip(
                structural(text),
                self.structural_mean,
                self.structural_scale,
                self.structural_weights,
                strict=True,
            ):
                z += (value - mean) / scale * weight
        return z

    def score(self, text: str) -> float:
        return sigmoid(self.logit(text))


def sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def logit(p: float, eps: float = 1e-6) -> float:
    p = min(1.0 - eps, max(eps, p))
    return math.log(p / (1.0 - p))


@cache
def load_prior(path: Path = ARTIFACT) -> Prior:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: the triage prior is missing; build it with `python -m workers.router.train`"
        ) from None
    return Prior.from_dict(doc)
