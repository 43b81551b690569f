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
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from tierfleet.errors import InvalidOutput
from workers.backends.base import Completion

LOW_CONFIDENCE_RULE = "logprob"


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    schema = json.loads(schema_json)
    return jsonschema.validators.validator_for(schema)(schema)


def _strip_fence(text: str) -> str:
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```") and stripped.count("```") == 2:
        body = stripped[3:-3]
        first_newline = body.find("\n")
        if first_newline != -1 and body[:first_newline].strip() in ("", "json"):
            body = body[first_newline + 1 :]
        return body.strip()
    return stripped


def validate(
    completion: Completion,
    output_schema: Mapping[str, Any] | None,
    *,
    min_mean_logprob: float | None = None,
) -> Any:
    """Return the result to store, or raise `InvalidOutput` naming the rule it broke."""
    if completion.finish_reason in ("length", "max_tokens"):
        raise InvalidOutput("the answer was cut off at max_tokens", rule="length")
    if not completion.text.strip():
        raise InvalidOutput("the answer is empty", rule="empty")

    result: Any = completion.text
    if output_schema is not None:
        try:
            result = json.loads(_strip_fence(completion.text))
        except json.JSONDecodeError as exc:
            raise InvalidOutput(f"the answer is not JSON: {exc}", rule="json") from None
        validator = _validator(json.dumps(output_schema, sort_keys=True))
        error = best_match(validator.iter_errors(result))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise InvalidOutput(f"schema: {error.message} at {where}", rule="schema")

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
