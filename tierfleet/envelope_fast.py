"""A typed decoder for the job envelope: bytes to a `JobSpec` in one step (msgspec).

The bulk path reads millions of lines; decoding and validating each into typed structs in
C costs a fraction of parsing JSON and then running a JSON Schema validator over it. This
decoder is a fast path only, and deliberately no looser than `schemas/job.schema.json`:
whatever it rejects goes through `parse_envelope`, the reference, which either finds the
line valid after all (the decoder is stricter in a few corners, e.g. `2.0` as an
integer) or names the field at fault.

(No `from __future__ import annotations` here: msgspec reads the struct annotations,
which refer to the patterns loaded from the schema at run time.)
"""

import functools
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
import orjson
from msgspec import UNSET, Meta, Struct, UnsetType

from tierfleet import constants as C
from tierfleet.envelope import JobSpec, check_output_schema, named_output_schema
from tierfleet.errors import InvalidEnvelope
from tierfleet.resources import schemas_dir


@functools.cache
def _patterns() -> dict[str, str]:
    props = json.loads((schemas_dir() / "job.schema.json").read_text())["properties"]
    named = next(b["pattern"] for b in props["output_schema"]["oneOf"] if "pattern" in b)
    return {
        "id": props["id"]["pattern"],
        "feature": props["feature"]["pattern"],
        "route": props["route"]["pattern"],
        "schema_name": named,
    }


@functools.cache
def _decoder() -> msgspec.json.Decoder[Any]:
    p = _patterns()

    class Message(Struct, forbid_unknown_fields=True):
        role: Literal["user", "assistant"]
        content: Annotated[str, Meta(min_length=1)]

    class Envelope(Struct, forbid_unknown_fields=True):
        feature: Annotated[str, Meta(pattern=p["feature"])] | UnsetType = UNSET
        schema_version: Literal[1] | UnsetType = UNSET
        id: Annotated[str, Meta(pattern=p["id"])] | UnsetType = UNSET
        idempotency_key: Annotated[str, Meta(min_length=1, max_length=200)] | UnsetType = UNSET
        messages: Annotated[list[Message], Meta(min_length=1, max_length=500)] | UnsetType = UNSET
        prompt: Annotated[str, Meta(min_length=1)] | UnsetType = UNSET
        system: str | UnsetType = UNSET
        output_schema: (
            dict[str, Any] | Annotated[str, Meta(pattern=p["schema_name"])] | UnsetType
        ) = UNSET
        max_tokens: Annotated[int, Meta(ge=1, le=32768)] | UnsetType = UNSET
        temperature: Annotated[float, Meta(ge=0, le=2)] | UnsetType = UNSET
        route: Annotated[str, Meta(pattern=p["route"])] | UnsetType = UNSET
        latency: Literal["interactive", "batch"] | UnsetType = UNSET
        metadata: dict[str, Any] | UnsetType = UNSET

    return msgspec.json.Decoder(Envelope)


_CONTROL = re.compile("[\x00-\x1f\x7f]")


class NotFast(Exception):
    """The fast path declined; the reference parser decides."""


def decode(
    line: bytes, defaults: Mapping[str, Any], job_id: str, key: str, tiers: tuple[str, ...]
) -> JobSpec:
    """A job from one JSONL line, with `defaults` for absent fields (already valid) and
    `job_id` / `key` when the line gives none. Raises `NotFast` when the line needs the
    reference parser (invalid, or in a corner the decoder is stricter about)."""
    try:
        env = _decoder().decode(line)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise NotFast from None  # (RecursionError: arrays or objects nested thousands deep)
    for value in (env.id, env.idempotency_key, env.feature, env.route):
        if isinstance(value, str) and _CONTROL.search(value):
            raise NotFast  # the schema forbids control characters in identifiers
    has_messages, has_prompt = env.messages is not UNSET, env.prompt is not UNSET
    if has_messages == has_prompt:
        raise NotFast
    feature = env.feature if env.feature is not UNSET else defaults.get("feature")
    route = env.route if env.route is not UNSET else defaults.get("route", C.ROUTE_AUTO)
    if feature is None or (route != C.ROUTE_AUTO and route not in tiers):
        raise NotFast
    if has_messages:
        messages = tuple({"role": m.role, "content": m.content} for m in env.messages)
        if messages[-1]["role"] != "user":
            raise NotFast
    else:
        messages = ({"role": "user", "content": env.prompt},)
    free_form = {  # nested as in the envelope, and in the payload the ledger stores
        name: value
        for name, value in (("metadata", env.metadata), ("output_schema", env.output_schema))
        if isinstance(value, dict)
    }
    if free_form:
        try:  # what the ledger's orjson cannot write: integers over 64 bits, 255 levels deep
            orjson.dumps(free_form)
        except orjson.JSONEncodeError:
            raise NotFast from None
    schema: Mapping[str, Any] | None = None
    schema_name: str | None = None
    try:
        if isinstance(env.output_schema, str):
            schema_name, schema = env.output_schema, named_output_schema(env.output_schema)
        elif env.output_schema is not UNSET:
            schema = env.output_schema
            check_output_schema(schema)
    except InvalidEnvelope:
        raise NotFast from None
    return JobSpec(
        id=env.id if env.id is not UNSET else job_id,
        feature=feature,
        messages=messages,
        system=env.system if env.system is not UNSET else None,
        output_schema=schema,
        output_schema_name=schema_name,
        max_tokens=env.max_tokens if env.max_tokens is not UNSET else 512,
        temperature=float(env.temperature) if env.temperature is not UNSET else 0.0,
        route=route,
        latency=env.latency if env.latency is not UNSET else defaults.get("latency", "interactive"),
        idempotency_key=env.idempotency_key if env.idempotency_key is not UNSET else key,
        metadata=env.metadata if env.metadata is not UNSET else {},
    )
