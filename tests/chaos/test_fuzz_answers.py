"""Fuzzing what models answer: any text a provider can hand back (NULs, lone surrogates,
NaN and Infinity, numbers too large for JSON readers or for 64 bits, nesting too deep for
the validator or the ledger, stray and doubled fences), with any finish reason, through
the attempt step (`_call`: validation and the storability check) and its booking in the
real Postgres ledger.

Whatever the answer, the step raises nothing; the call has exactly one attempt row,
`succeeded` or `invalid`, billed its real cost, which is the job's cost; the job is no
longer running; a succeeded job's result reads back as it was validated, and can be
written out again; an invalid attempt's error says why, stored as text the ledger holds.

The same examples each run; a deeper, random run:
`TIERFLEET_FUZZ_EXAMPLES=2000 TIERFLEET_FUZZ_RANDOM=1 pytest tests/chaos/test_fuzz_answers.py
--timeout 1800`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from tests.integration.test_steps import script
from tierfleet.constants import JobStatus, Outcome
from tierfleet.db import Ledger
from tierfleet.envelope import JobSpec, parse_envelope
from tierfleet.models import Attempt, Job
from tierfleet.prices import Usage
from tierfleet.settings import Settings
from tierfleet.store import insert_job
from tierfleet.transport import make_celery
from workers.backends.base import Completion
from workers.execute import attempt_job, triage_job
from workers.runtime import Runtime
from workers.validation import validate

pytestmark = pytest.mark.chaos

CHAOS = settings.get_profile("chaos")
EXAMPLES = int(os.environ.get("TIERFLEET_FUZZ_EXAMPLES", "150"))
RANDOM = bool(os.environ.get("TIERFLEET_FUZZ_RANDOM"))
USAGE = Usage(40, 12)

SCHEMAS: dict[str, Any] = {
    "none": None,  # the result is the answer's text
    "anything": {},
    "object": {"type": "object"},
    "sentiment": "sentiment",
    "recursive": {"type": "array", "items": {"$ref": "#"}},
}

# ---------------------------------------------------------------------------------------
# Strategies

awkward_chars = st.sampled_from(
    ["\x00", "\ud800", "\udfff", "\ufffd", "\\u0000", "\x1f", "\u2028", "é", "\U0001d11e", "`"]
)
strings = st.lists(st.text(max_size=6) | awkward_chars, max_size=6).map("".join)
numbers = st.one_of(
    st.integers(),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(),  # NaN and the infinities too: `json.dumps` writes them as NaN, Infinity
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, 5e-324]),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | strings,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(strings, inner, max_size=4),
    max_leaves=10,
)


@st.composite
def answer_texts(draw: st.DrawFn) -> str:
    """What a model may answer: JSON written with or without escapes, a number with more
    digits than Python reads, nesting deeper than the ledger (255) or the validator
    takes, plain text, and any of these in or around a fence."""
    kind = draw(st.sampled_from(["json", "raw-json", "digits", "deep", "text", "sentiment"]))
    if kind == "json":
        text = json.dumps(draw(json_values))  # NaN, Infinity; surrogates as \ud800 escapes
    elif kind == "raw-json":
        text = json.dumps(draw(json_values), ensure_ascii=False)  # the characters themselves
    elif kind == "digits":
        text = '{"label": "positive", "confidence": ' + "7" * draw(st.integers(300, 6000)) + "}"
    elif kind == "deep":
        depth = draw(st.sampled_from([200, 254, 255, 256, 400, 999, 1000, 5000]))
        open_, close = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        text = open_ * depth + "1" + close * depth
    elif kind == "sentiment":
        label = draw(st.sampled_from(["positive", "posi\\u0000tive", "neutral"]))
        confidence = draw(st.sampled_from(["0.5", "NaN", "Infinity", "-0", "1e400", "1"]))
        text = f'{{"label": "{label}", "confidence": {confidence}}}'
    else:
        text = draw(strings)
    fence = draw(st.sampled_from(["", "```json\n", "```\n", "```", "``` json ```\n"]))
    tail = draw(st.sampled_from(["", "\n```", "```", "\n```\n```"]))
    return f"{fence}{text}{tail}" if fence or tail else text


finish_reasons = st.sampled_from(["stop", "tool_use", "end_turn", "length", "stop\x00", "\ud800"])


# ---------------------------------------------------------------------------------------
# The property


@pytest.fixture
def rt(settings: Settings, ledger: Ledger) -> Iterator[Runtime]:
    """A worker's runtime on the test ledger (as `tests/integration/conftest.py` has)."""
    celery = make_celery(settings)
    runtime = Runtime.build(settings, celery, ledger)
    yield runtime
    runtime.close()
    celery.close()


def new_job(rt: Runtime, schema: Any, route: str) -> tuple[str, JobSpec]:
    envelope: dict[str, Any] = {"feature": "fuzz", "prompt": "Answer", "route": route}
    if schema is not None:
        envelope["output_schema"] = schema
    spec = parse_envelope(envelope)
    with rt.ledger.session() as s:
        job_id, _ = insert_job(s, spec)
    triage_job(rt, job_id)
    return job_id, spec


@settings(
    CHAOS,
    max_examples=EXAMPLES,
    derandomize=not RANDOM,
    database=None,
    # one runtime and ledger for all examples: each example has a job of its own
    suppress_health_check=[*CHAOS.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(
    text=answer_texts(),
    schema=st.sampled_from(sorted(SCHEMAS)),
    route=st.sampled_from(["slm", "frontier"]),
    finish_reason=finish_reasons,
)
@example(text="Fine\x00print.", schema="none", route="slm", finish_reason="stop")
@example(text='{"s": "\\ud800"}', schema="object", route="frontier", finish_reason="stop")
@example(text='{"n": NaN}', schema="anything", route="slm", finish_reason="stop")
@example(text="[" * 400 + "]" * 400, schema="recursive", route="slm", finish_reason="stop")
@example(text='{"a": 1e400}', schema="object", route="slm", finish_reason="tool_use")
@example(text='{"a": 18446744073709551616}', schema="object", route="slm", finish_reason="stop")
@example(text='{"a": 1e20, "b": 1e16}', schema="object", route="slm", finish_reason="stop")
def test_any_answer_is_booked_once_with_its_cost(
    rt: Runtime, text: str, schema: str, route: str, finish_reason: str
) -> None:
    job_id, spec = new_job(rt, SCHEMAS[schema], route)
    answer = Completion(text, USAGE, finish_reason)
    backend = script(rt, route, answer)
    attempt_job(rt, job_id, route)  # raises nothing

    with rt.ledger.session() as s:
        job = s.get_one(Job, job_id)
        [attempt] = s.execute(select(Attempt).where(Attempt.job_id == job_id)).scalars()
    assert backend.calls == 1
    assert attempt.outcome in (Outcome.SUCCEEDED, Outcome.INVALID)
    cost = rt.prices[rt.settings.model_for(route)].cost_usd(USAGE)
    assert attempt.cost_usd == job.cost_usd == cost > 0
    assert job.status is not JobStatus.RUNNING and job.lease_until is None
    if attempt.outcome == Outcome.SUCCEEDED:
        assert job.status is JobStatus.SUCCEEDED
        # as validated (1e16 reads back as 10000000000000000: the same JSON number), and
        # the results can be written as `orjson` writes them (`tierfleet results`, files)
        assert as_decimals(job.result) == as_decimals(validate(answer, spec.output_schema))
        orjson.dumps(job.result)
    else:
        assert attempt.error and "\x00" not in attempt.error
        assert job.result is None
    assert attempt.finish_reason is None or "\x00" not in attempt.finish_reason


def as_decimals(value: Any) -> Any:
    """`value` with its numbers as the decimals their JSON says: Postgres gives a float
    with no fraction back as an integer (5.260530579410009e+16 as 52605305794100090)."""
    if isinstance(value, dict):
        return {k: as_decimals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_decimals(v) for v in value]
    if isinstance(value, float | int) and not isinstance(value, bool):
        return Decimal(repr(value))
    return value
