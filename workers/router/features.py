"""What the prior reads off a prompt: word and word-pair terms, and a few structural
measures. Pure Python, shared by training (`train.py` hands these to scikit-learn) and
scoring, so that the two can never disagree on a token."""

from __future__ import annotations

import math
import re
from collections import Counter
from itertools import pairwise

_WORD = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern
_CODE = re.compile(r"```|\bdef |\bclass |\bfunction\b|\breturn\b|=>|;\s*$|\bimport\b", re.M)
_MATH = re.compile(r"\d\s*[-+*/^=<>]\s*\d|\\frac|\\sqrt|\$[^$]+\$|\bequation\b|\bprove\b")
_STEP = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s", re.M)
_CHOICE = re.compile(r"(?:^|\s)\(?[A-Ea-e][.)]\s", re.M)
_ASK = re.compile(r"\b(?:explain|why|how|derive|compare|justify|step[- ]by[- ]step)\b", re.I)

STRUCTURAL = (
    "log_chars",  # length
    "log_lines",
    "digit_share",  # arithmetic, tables
    "code",  # code markers
    "math",  # formulas, equations
    "steps",  # enumerated items asked for
    "choices",  # a multiple-choice question
    "asks_reasoning",  # explain / why / derive / step by step
    "questions",  # question marks
)


def terms(text: str) -> list[str]:
    """Lower-cased words of two or more characters, and each adjacent pair."""
    words = _WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in pairwise(words)]


def term_counts(text: str) -> Counter[str]:
    return Counter(terms(text))


def structural(text: str) -> list[float]:
    """The `STRUCTURAL` measures of `text`, in that order."""
    chars = len(text)
    return [
        math.log1p(chars),
        math.log1p(text.count("\n")),
        sum(c.isdigit() for c in text) / (chars + 1),
        float(min(3, len(_CODE.findall(text)))),
        float(min(3, len(_MATH.findall(text)))),
        math.log1p(len(_STEP.findall(text))),
        float(len(_CHOICE.findall(text)) >= 2),
        float(min(3, len(_ASK.findall(text)))),
        math.log1p(text.count("?")),
    ]
