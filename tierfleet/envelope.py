"""The job envelope: validation against `schemas/job.schema.json`, and the normalised job.

`parse_envelope()` is the one gate every producer goes through. It either returns a
`JobSpec` that workers can run without further checks, or raises `InvalidEnvelope`
naming the field, before anything is written anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fastjsonschema
import jsonschema
import orjson
from jsonschema.exceptions import SchemaError, ValidationError, best_match

from tierfleet import constants as C
from tierfleet import schema_guard
from tierfleet.errors import InvalidEnvelope
from tierfleet.resources import schemas_dir

MAX_ENVELOPE_BYTES = 1_000_000
DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A valid, normalised job: what the ledger stores and the workers run."""

    id: str
    feature: str
    messages: tuple[Mapping[str, str], ...]
    system: str | None = None
    output_schema: Mapping[str, Any] | None = None
    output_schema_name: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    route: str = C.ROUTE_AUTO
    latency: str = "interactive"
    idempotency_key: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        """The JSON document stored in `jobs.payload`; `from_row` reads it back. A named
        output schema is stored by name (it ships with the code, in schemas/outputs/),
        so a million jobs do not carry a million copies of it."""
        return {
            "schema_version": C.ENVELOPE_VERSION,
            "messages": [dict(m) for m in self.messages],
            "system": self.system,
            "output_schema": None if self.output_schema_name else self.output_schema,
            "output_schema_name": self.output_schema_name,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "metadata": dict(self.metadata),
        }

    def payload_json(self, limit: int = MAX_ENVELOPE_BYTES) -> bytes:
        """`payload()` as the JSON the ledger stores (orjson, as `models.JSONText` writes
        it), serialised once to be measured and then stored as is. Raises
        `InvalidEnvelope` naming the size when it is over `limit` bytes."""
        blob = orjson.dumps(self.payload())
        if len(blob) > limit:
            raise InvalidEnvelope(
                f"the job is {len(blob):,} bytes as JSON, over the {limit:,}-byte limit"
            )
        return blob

    @classmethod
    def from_row(
        cls, *, id: str, feature: str, route: str, latency: str, payload: Mapping[str, Any]
    ) -> JobSpec:
        name = payload.get("output_schema_name")
        schema = payload.get("output_schema")
        if schema is None and name:
            schema = named_output_schema(name)
        return cls(
            id=id,
            feature=feature,
            route=route,
            latency=latency,
            messages=tuple(payload["messages"]),
            system=payload.get("system"),
            output_schema=schema,
            output_schema_name=name,
            max_tokens=payload["max_tokens"],
            temperature=payload["temperature"],
            metadata=payload.get("metadata") or {},
        )

    @property
    def prompt_chars(self) -> int:
        return len(self.system or "") + sum(len(m["content"]) for m in self.messages)

    @property
    def estimated_prompt_tokens(self) -> int:
        """A tokenizer-free upper estimate (about four characters a token)."""
        return self.prompt_chars // 4 + 4 * len(self.messages) + 8


@functools.cache
def _envelope_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((schemas_dir() / "job.schema.json").read_text(encoding="utf-8"))
    schema_guard.check_meta(schema, schema_guard.draft_of(schema))
    validator: jsonschema.protocols.Validator = schema_guard.safe_validator(schema)
    return validator


@functools.cache
def _fast_validator() -> Any:
    """The envelope schema compiled to Python (fastjsonschema): about ten times faster
    than `jsonschema`, for the common case of a valid envelope. The schema keeps to
    keywords that mean the same in draft 7, which fastjsonschema compiles. Its verdict
    "invalid" is only a hint: the message always comes from `jsonschema`, the reference."""
    schema = json.loads((schemas_dir() / "job.schema.json").read_text(encoding="utf-8"))
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    # Two `oneOf`s cost the compiled validator an exception per branch tried. Their
    # equivalents: "messages xor prompt" is checked in `parse_envelope` before the
    # validator runs; "object, or a string matching the pattern" is `type` + `pattern`
    # (a pattern applies to strings only).
    del schema["oneOf"]
    output = schema["properties"]["output_schema"]
    pattern = next(b["pattern"] for b in output.pop("oneOf") if "pattern" in b)
    output.update({"type": ["object", "string"], "pattern": pattern})
    return fastjsonschema.compile(schema, use_default=False)


@functools.cache
def named_output_schema(name: str) -> Mapping[str, Any]:
    """A schema shipped in `schemas/outputs/` (the one a `$ref` to
    `urn:tierfleet:output:NAME` resolves to), checked as a user's schema is."""
    named = schema_guard.named_schemas()
    if name not in named:
        raise InvalidEnvelope(
            f"unknown output schema {name!r}; known: {', '.join(sorted(named)) or 'none'}",
            field="output_schema",
        )
    schema = named[name]
    check_output_schema(schema)  # once per process, not per job
    return schema


def _field_path(error: ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(error: ValidationError) -> tuple[str, str]:
    """A message a person can act on, and the field it is about."""
    path = _field_path(error)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        where = f"{path}.{extra[0]}" if path and extra else (extra[0] if extra else path)
        return f"unknown field {extra[0]!r}" if extra else error.message, where
    if error.validator == "oneOf" and not path:
        has = [k for k in ("messages", "prompt") if k in error.instance]
        msg = (
            "give either 'messages' or 'prompt', not both"
            if len(has) == 2
            else "one of 'messages' or 'prompt' is required"
        )
        return msg, "messages" if has else "prompt"
    if error.validator == "not" and isinstance(error.instance, str):
        return "must not contain control characters (newline, tab, NUL, ...)", path
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else ""
        return f"required field {missing!r} is missing", f"{path}.{missing}".lstrip(".")
    return error.message, path


def check_output_schema(schema: Any, field_name: str = "output_schema") -> None:
    """Raise `InvalidEnvelope` unless `schema` is a valid JSON Schema that is safe to run
    (`tierfleet.schema_guard`: within the size limits, patterns re2 can run, references
    only inside it or to shipped schemas). Checking against the meta-schema is costly, and
    a batch repeats its schemas: results are cached."""
    if not isinstance(schema, Mapping):
        raise InvalidEnvelope("must be a JSON Schema object", field=field_name)
    try:
        text = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        raise InvalidEnvelope(f"cannot be stored as JSON: {exc}", field=field_name) from None
    try:
        _check_schema_text(text)
    except schema_guard.UnsafeSchema as exc:
        raise InvalidEnvelope(str(exc), field=field_name) from None
    except SchemaError as exc:
        where = ".".join(str(p) for p in exc.absolute_path)
        raise InvalidEnvelope(
            f"is not a valid JSON Schema: {exc.message}" + (f" (at {where})" if where else ""),
            field=field_name,
        ) from None


@functools.lru_cache(maxsize=1024)
def _check_schema_text(text: bytes) -> None:
    """The cheap checks first (size, depth, patterns), then the meta-schema, then the
    references (which need a schema the meta-schema accepts)."""
    schema = orjson.loads(text)
    schema_guard.check_shape(schema, len(text))
    cls = _declared_draft(schema)
    try:
        schema_guard.check_meta(schema, cls)
        schema_guard.check_refs(schema, cls)
    except RecursionError:  # a safety net: check_shape bounds the nesting well under it
        raise SchemaError("it nests too deeply to be checked") from None


def _declared_draft(schema: Any) -> Any:
    """The validator class for the draft `schema` declares (the latest when it declares
    none). A `$schema` that names no draft jsonschema knows is an error here: jsonschema
    would only warn, and check the schema against a draft it was not written for."""
    if not isinstance(schema, dict) or "$schema" not in schema:
        return jsonschema.validators.validator_for(schema)
    declared = schema["$schema"]
    cls = None
    if isinstance(declared, str):
        with contextlib.suppress(ValueError):  # ValueError: not even a URI, e.g. "http://["
            cls = jsonschema.validators.validator_for(schema, default=None)
    if cls is None:
        raise SchemaError(f"$schema {declared!r} names no JSON Schema draft", path=["$schema"])
    return cls


def _check_storable(data: Mapping[str, Any]) -> None:
    """The ledger stores a job as orjson writes it (`jobs.payload`): refuse, naming the
    field, what it cannot write although the schema allows it: an integer beyond 64 bits,
    a lone surrogate (`"\\ud800"` read by a lenient parser), nesting over 254 deep."""
    try:
        orjson.dumps(data)
    except orjson.JSONEncodeError as exc:
        for key, value in data.items():
            try:
                orjson.dumps({key: value})  # nested as deep as in the payload
            except orjson.JSONEncodeError as inner:
                message = f"cannot be stored as JSON: {inner}"
                raise InvalidEnvelope(message, field=str(key)) from None
        raise InvalidEnvelope(f"cannot be stored as JSON: {exc}") from None


def parse_envelope(
    data: Any, *, tiers: Sequence[str] = C.TIER_LADDER, validated: bool = False
) -> JobSpec:
    """Validate one envelope and normalise it; raise `InvalidEnvelope` naming the field.
    `validated=True` skips the schema check, for an envelope that passed it already."""
    if not isinstance(data, Mapping):
        raise InvalidEnvelope(f"a job envelope is a JSON object, not {type(data).__name__}")
    try:
        if not validated:
            if ("messages" in data) == ("prompt" in data):
                raise fastjsonschema.JsonSchemaException("messages xor prompt")
            _fast_validator()(data)
    except fastjsonschema.JsonSchemaException:
        error = best_match(_envelope_validator().iter_errors(data))
        if error is not None:
            message, where = _describe(error)
            raise InvalidEnvelope(message, field=where) from None
    _check_storable(data)
    temperature = float(data.get("temperature", 0.0))
    if not math.isfinite(temperature):  # NaN passes `minimum` and `maximum` both
        raise InvalidEnvelope("must be a finite number", field="temperature")

    route = data.get("route", C.ROUTE_AUTO)
    if route != C.ROUTE_AUTO and route not in tiers:
        raise InvalidEnvelope(
            f"unknown tier {route!r}; use 'auto' or one of: {', '.join(tiers)}", field="route"
        )

    schema_name: str | None = None
    output_schema = data.get("output_schema")
    if isinstance(output_schema, str):
        schema_name = output_schema
        output_schema = named_output_schema(schema_name)  # checked when loaded
    elif output_schema is not None:
        check_output_schema(output_schema)

    if "messages" in data:
        messages = tuple({"role": m["role"], "content": m["content"]} for m in data["messages"])
        if messages[-1]["role"] != "user":
            raise InvalidEnvelope(
                "the last message must be the user's", field=f"messages[{len(messages) - 1}].role"
            )
    else:
        messages = ({"role": "user", "content": data["prompt"]},)

    return JobSpec(
        id=data.get("id") or str(uuid.uuid4()),
        feature=data["feature"],
        messages=messages,
        system=data.get("system"),
        output_schema=output_schema,
        output_schema_name=schema_name,
        max_tokens=int(data.get("max_tokens", DEFAULT_MAX_TOKENS)),  # 2.0 is an integer too
        temperature=temperature,
        route=route,
        latency=data.get("latency", "interactive"),
        idempotency_key=data.get("idempotency_key"),
        metadata=data.get("metadata") or {},
    )
