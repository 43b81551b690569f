"""What the ledger can store of a model answer, checked before it is booked.

A paid answer must be booked, so nothing the answer holds may make the booking fail. The
ledger stores a job's result as JSON (written as `orjson` writes it: no lone surrogate,
integers within 64 bits, at most 255 levels deep) in Postgres, whose text and jsonb hold
no NUL character, and whose JSON has no NaN or Infinity (which Python's JSON reader
accepts, and `orjson` would quietly write as null), and whose JSON numbers come back
integers when they have no fraction (a float past 64 bits would come back an integer
`orjson` cannot write). A result that breaks any of these is an invalid answer
(`unstorable`); the texts an attempt's row carries are made storable.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import orjson

UNSTORABLE_RULE = "unstorable"
VALIDATOR_RULE = "validator"  # the validator raised: it cannot judge the answer
MAX_ERROR_CHARS = 2_000  # an attempt's error: what it says, not all it quotes
MAX_FINISH_REASON_CHARS = 32  # `attempts.finish_reason`
_NUL = "\x00"
# The integers `orjson` writes. Postgres gives a float this large back as an integer (1e20
# as 100000000000000000000), which the results (written by `orjson`) could not hold.
_INT_RANGE = (-(2**63), 2**64)
_SHOWN_KEY_CHARS = 40


def unstorable(result: Any) -> str | None:
    """Why the ledger cannot store `result` as it is, or None when it can."""
    try:
        orjson.dumps(result)
    except TypeError as exc:  # orjson.JSONEncodeError
        return f"the answer cannot be stored: {exc}"
    for where, value in _leaves(result):
        if isinstance(value, str) and _NUL in value:
            return f"the answer cannot be stored: a NUL character (\\u0000) {where}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"the answer cannot be stored: the number {value} {where}"
        if isinstance(value, float) and not _INT_RANGE[0] <= value < _INT_RANGE[1]:
            return (
                f"the answer cannot be stored: the number {value} {where} would read back as "
                "an integer over 64 bits"
            )
    return None


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every string and number of a JSON value, and where it is (`orjson` has checked
    that the value is at most 255 levels deep)."""
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}/{_shown(key)}"
            yield f"in a key at {path or '(root)'}", key
            yield from _leaves(item, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}/{i}")
    else:
        yield f"at {path or '(root)'}", value


def _shown(key: Any) -> str:
    text = str(key).replace(_NUL, "\\u0000")
    return text if len(text) <= _SHOWN_KEY_CHARS else text[:_SHOWN_KEY_CHARS] + "..."


def text(value: str | None, limit: int = MAX_ERROR_CHARS) -> str | None:
    """`value` as the ledger can store it in a text column of `limit` characters: NULs
    and lone surrogates replaced (by U+FFFD), cut at `limit` with an ellipsis."""
    if value is None:
        return None
    clean = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    clean = clean.replace(_NUL, "\ufffd")
    if len(clean) <= limit:
        return clean
    return clean[: max(0, limit - 1)] + "\u2026"
