"""External, deterministic validation of a model answer.

The rules, in order: the model did not stop for length; the answer is not empty; with an
output schema, it parses as JSON (one surrounding ```json fence is tolerated) and
satisfies the schema; on a lower tier, the mean token log-probability is not under the
configured threshold. Self-reported confidence is never read.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any, Final

import referencing.exceptions
from jsonschema.exceptions import best_match

from tierfleet import schema_guard
from tierfleet.errors import InvalidOutput
from workers.backends.base import Completion

LOW_CONFIDENCE_RULE: Final = "logprob"
TIMEOUT_RULE: Final = "validation_timeout"  # validating one answer ran past its deadline
DEPTH_RULE: Final = "validation_depth"  # the answer, or the schema's references, too deep
REF_RULE: Final = "schema_ref"  # a reference the schema holds resolves to nothing
UNSAFE_SCHEMA_RULE: Final = "schema_unsafe"  # a schema that bypassed the submission checks
VALIDATION_DEADLINE_S: Final = 5.0  # per answer, parsing excluded


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    try:
        return schema_guard.safe_validator(json.loads(schema_json))
    except schema_guard.UnsafeSchema as exc:
        raise InvalidOutput(f"the output schema {exc}", rule=UNSAFE_SCHEMA_RULE) from None


def _strip_fence(text: str) -> str:
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```") and stripped.count("```") == 2:
        body = stripped[3:-3]
        first_newline = body.find("\n")
        if first_newline != -1 and body[:first_newline].strip() in ("", "json"):
            body = body[first_newline + 1 :]
        return body.strip()
    return stripped


def _parse(text: str) -> Any:
    try:
        return json.loads(_strip_fence(text))
    except ValueError as exc:  # JSONDecodeError, or an integer over Python's digits limit
        raise InvalidOutput(f"the answer is not JSON: {exc}", rule="json") from None
    except RecursionError:
        raise InvalidOutput("the answer is not JSON: it nests too deeply", rule="json") from None


def _check(result: Any, output_schema: Mapping[str, Any], deadline_s: float) -> None:
    validator = _validator(json.dumps(output_schema, sort_keys=True))
    try:
        with schema_guard.deadline(deadline_s):
            error = best_match(validator.iter_errors(result))
    except schema_guard.DeadlineExceeded:
        message = f"checking the answer against the schema took over {deadline_s}s"
        raise InvalidOutput(message, rule=TIMEOUT_RULE) from None
    except RecursionError:
        message = "the answer, or the schema's references, nest too deeply to be checked"
        raise InvalidOutput(message, rule=DEPTH_RULE) from None
    except referencing.exceptions.Unresolvable as exc:
        ref = getattr(exc, "ref", None) or str(exc)
        message = f"the output schema refers to {ref[:200]!r}, which it does not hold"
        raise InvalidOutput(message, rule=REF_RULE) from None
    except schema_guard.UnsafePattern as exc:
        raise InvalidOutput(
            f"a pattern of the output schema {exc}", rule=UNSAFE_SCHEMA_RULE
        ) from None
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise InvalidOutput(f"schema: {error.message} at {where}", rule="schema")


def validate(
    completion: Completion,
    output_schema: Mapping[str, Any] | None,
    *,
    min_mean_logprob: float | None = None,
    deadline_s: float = VALIDATION_DEADLINE_S,
) -> Any:
    """Return the result to store, or raise `InvalidOutput` naming the rule it broke.
    Checking the answer against the schema stops after `deadline_s` (an invalid answer)."""
    if completion.finish_reason in ("length", "max_tokens"):
        raise InvalidOutput("the answer was cut off at max_tokens", rule="length")
    if not completion.text.strip():
        raise InvalidOutput("the answer is empty", rule="empty")

    result: Any = completion.text
    if output_schema is not None:
        result = _parse(completion.text)
        _check(result, output_schema, deadline_s)

    if (
        min_mean_logprob is not None
        and completion.mean_logprob is not None
        and completion.mean_logprob < min_mean_logprob
    ):
        raise InvalidOutput(
            f"mean token logprob {completion.mean_logprob:.3f} under {min_mean_logprob}",
            rule=LOW_CONFIDENCE_RULE,
        )
    return result
