"""How much `parse_envelope()` costs on top of bare JSON Schema validation.

Both sides validate the same example envelopes in the same run: bare
`jsonschema` validation of the envelope against `schemas/job.schema.json`, and tierfleet's
full parse (validation, named output schema resolution and check, normalisation). A bulk
submit parses every line, so this ratio bounds its CPU cost per job.

    .venv/bin/python bench/envelope_parse.py [--rounds N]

Prints jobs/s for both and, last, `envelope_parse_vs_bare_jsonschema: X` (bare time over
full time; 1.0 means no overhead).
"""

from __future__ import annotations

import argparse
import json
import time

import jsonschema

from tierfleet.envelope import parse_envelope
from tierfleet.resources import examples_dir, schemas_dir


def best_of(rounds: int, fn: object, items: list[dict[str, object]]) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for item in items:
            fn(item)  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description="envelope parse vs bare jsonschema")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    lines = (examples_dir() / "jobs.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines] * 10
    schema = json.loads((schemas_dir() / "job.schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)

    bare = best_of(args.rounds, validator.validate, items)
    full = best_of(args.rounds, parse_envelope, items)
    print(f"bare jsonschema: {len(items) / bare:,.0f} envelopes/s")
    print(f"parse_envelope:  {len(items) / full:,.0f} envelopes/s")
    print(f"envelope_parse_vs_bare_jsonschema: {bare / full:.2f}")


if __name__ == "__main__":
    main()
