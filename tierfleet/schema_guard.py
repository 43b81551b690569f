"""User-supplied JSON Schemas, made safe to check and to validate answers with.

A job's `output_schema` comes from whoever submits the job, and every worker runs it on a
model's answer. Four things keep that from costing more than an answer is worth:

- **Patterns** (`pattern`, the keys of `patternProperties`, and so `additionalProperties`
  and `propertyNames`) run on google-re2, which matches in time linear in the string: no
  pattern can backtrack catastrophically. JSON Schema patterns are ECMA-262 and
  unanchored (a search); `\\uXXXX` escapes are translated, and re2's `\\d`, `\\w` and `$`
  already mean what ECMA-262 says (ASCII digits, end of input). A pattern re2 cannot
  compile (a lookaround, a backreference, a repetition over 1000) is **refused at
  submission**, naming where it is, rather than run on a backtracking engine with a
  timeout: a timeout still lets one answer hold a worker for its full length, once per
  string the pattern is tried on, and two engines would be two meanings of one pattern.
  A payload that bypassed submission meets the same refusal at validation time.
- **References** resolve only inside the schema (a `#...` fragment, or a URI equal to an
  `$id` it declares) or to a schema shipped in `schemas/outputs/`, as
  `urn:tierfleet:output:NAME` (e.g. `{"$ref": "urn:tierfleet:output:sentiment"}`). At
  submission any other `$ref`, `$dynamicRef` or `$recursiveRef`, wherever it sits, is
  refused; at validation the registry holds only the shipped schemas and its retrieve
  function refuses every URI, so nothing is ever fetched from the network or the disk.
- **Size**: a schema is refused over `MAX_OUTPUT_SCHEMA_BYTES`, `MAX_OUTPUT_SCHEMA_VALUES`,
  `MAX_OUTPUT_SCHEMA_SUBSCHEMAS` or `MAX_OUTPUT_SCHEMA_DEPTH`, before the (costly)
  meta-schema check runs.
- **Time**: validation of one answer stops at a deadline (`deadline()`), checked before
  each keyword, and `uniqueItems` is checked in linear time.

`safe_validator()` is the one way the project builds a jsonschema validator.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Final

import jsonschema
import re2
import referencing
import referencing.exceptions
import referencing.jsonschema
from jsonschema.exceptions import ValidationError

from tierfleet.resources import schemas_dir

MAX_OUTPUT_SCHEMA_BYTES: Final = 64_000  # as compact JSON
MAX_OUTPUT_SCHEMA_VALUES: Final = 10_000  # every JSON value in it, containers and scalars
MAX_OUTPUT_SCHEMA_SUBSCHEMAS: Final = 1_000  # JSON objects: what the meta-schema check costs
MAX_OUTPUT_SCHEMA_DEPTH: Final = 64  # objects and arrays nested in one another
MAX_PATTERN_CHARS: Final = 1_000
NAMED_SCHEMA_URI_PREFIX: Final = "urn:tierfleet:output:"
REF_KEYWORDS: Final = ("$ref", "$dynamicRef", "$recursiveRef")

Keyword = Callable[[Any, Any, Any, Any], Any]


class UnsafeSchema(ValueError):
    """A schema this module will not run; the message says what and where."""


class UnsafePattern(UnsafeSchema):
    pass


class DeadlineExceeded(Exception):
    """Validation of one answer ran past its `deadline()`."""


# ---------------------------------------------------------------------------------------
# Patterns

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False
# an escaped backslash (kept), or an ECMA-262 code point escape: \uXXXX, \u{X...}
_ECMA_ESCAPE = re.compile(r"\\\\|\\u([0-9A-Fa-f]{4})|\\u\{([0-9A-Fa-f]{1,6})\}")


def _to_re2(pattern: str) -> str:
    return _ECMA_ESCAPE.sub(
        lambda m: m[0] if m[0] == "\\\\" else "\\x{" + (m[1] or m[2]) + "}", pattern
    )


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Any:
    """`pattern` compiled by re2, or `UnsafePattern` saying why it cannot be."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise UnsafePattern(
            f"is {len(pattern):,} characters, over the {MAX_PATTERN_CHARS:,} allowed"
        )
    try:
        return re2.compile(_to_re2(pattern), options=_RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise UnsafePattern(
            f"cannot be run in linear time ({reason}); lookarounds and backreferences "
            "are not supported"
        ) from None
    except UnicodeError:
        raise UnsafePattern("holds a lone surrogate") from None


def pattern_search(pattern: str, text: str) -> bool:
    """Whether `pattern` matches anywhere in `text` (JSON Schema patterns are unanchored)."""
    compiled = compile_pattern(pattern)
    try:
        return compiled.search(text) is not None
    except UnicodeEncodeError:  # a lone surrogate, which UTF-8 cannot hold: U+FFFD
        clean = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return compiled.search(clean) is not None


def _is_safe_regex(instance: object) -> bool:
    if isinstance(instance, str):
        compile_pattern(instance)
    return True


# ---------------------------------------------------------------------------------------
# The walk: size, depth, patterns and references, with no recursion


def _where(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path) or "the root"


def _walk(schema: Any) -> Iterator[tuple[tuple[str | int, ...], dict[str, Any]]]:
    """Every object in `schema` with its path, refusing on the way a schema over the
    value, subschema or depth limits. Objects in data keywords (`enum`, `const`) are
    walked too: a `$ref` can point into them."""
    values = subschemas = 0
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        values += 1
        if values > MAX_OUTPUT_SCHEMA_VALUES:
            raise UnsafeSchema(f"has over the {MAX_OUTPUT_SCHEMA_VALUES:,} JSON values allowed")
        if len(path) >= MAX_OUTPUT_SCHEMA_DEPTH:
            raise UnsafeSchema(f"nests deeper than the {MAX_OUTPUT_SCHEMA_DEPTH} levels allowed")
        if isinstance(node, dict):
            subschemas += 1
            if subschemas > MAX_OUTPUT_SCHEMA_SUBSCHEMAS:
                raise UnsafeSchema(
                    f"has over the {MAX_OUTPUT_SCHEMA_SUBSCHEMAS:,} subschemas (objects) allowed"
                )
            yield path, node
            stack.extend(((*path, k), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend(((*path, i), v) for i, v in enumerate(node))


def _patterns(path: tuple[str | int, ...], node: dict[str, Any]) -> Iterator[tuple[str, str]]:
    if isinstance(node.get("pattern"), str):
        yield _where((*path, "pattern")), node["pattern"]
    if isinstance(node.get("patternProperties"), dict):
        for key in node["patternProperties"]:
            yield f"{_where((*path, 'patternProperties'))} key {key[:60]!r}", key


def check_shape(schema: Any, size_bytes: int) -> None:
    """Refuse, with `UnsafeSchema`, a schema too large or too deep to check cheaply, or
    with a pattern re2 cannot run. Cheap: one pass, before any meta-schema check."""
    if size_bytes > MAX_OUTPUT_SCHEMA_BYTES:
        raise UnsafeSchema(
            f"is {size_bytes:,} bytes as JSON, over the {MAX_OUTPUT_SCHEMA_BYTES:,}-byte limit"
        )
    unevaluated = patterned = None
    for path, node in _walk(schema):
        for where, pattern in _patterns(path, node):
            try:
                compile_pattern(pattern)
            except UnsafePattern as exc:
                raise UnsafePattern(f"its pattern at {where} {exc}") from None
            patterned = patterned or _where(path)
        if "unevaluatedProperties" in node:
            unevaluated = unevaluated or _where(path)
    if unevaluated and patterned:
        raise UnsafeSchema(
            f"uses unevaluatedProperties (at {unevaluated}) with patterns (at {patterned}); "
            "use additionalProperties instead"
        )


def _named_uri(ref: str) -> str | None:
    base = ref.split("#", 1)[0]
    name = base.removeprefix(NAMED_SCHEMA_URI_PREFIX)
    return base if name != base and name in named_schemas() else None


def check_refs(schema: Any, draft: Any) -> None:
    """Refuse, with `UnsafeSchema` naming it, any reference that does not resolve inside
    `schema` or to a shipped schema. `schema` has passed the meta-schema check."""
    nodes = list(_walk(schema))
    declared = {node["$id"] for _, node in nodes if isinstance(node.get("$id"), str)}
    resolver = None
    for path, node in nodes:
        for keyword in REF_KEYWORDS:
            ref = node.get(keyword)
            if not isinstance(ref, str) or ref.startswith("#") or _named_uri(ref):
                continue
            if ref.split("#", 1)[0] in declared:
                if resolver is None:
                    resolver = registry().resolver_with_root(_resource(schema, draft))
                try:
                    resolver.lookup(ref)
                    continue
                except referencing.exceptions.Unresolvable:
                    pass
            raise UnsafeSchema(
                f"{keyword} {ref[:100]!r} at {_where(path)} points outside the schema: a "
                "reference may point inside it ('#/$defs/...', or an $id it declares) or "
                f"to a shipped schema ('{NAMED_SCHEMA_URI_PREFIX}NAME')"
            )


def _resource(schema: Any, draft: Any) -> referencing.Resource[Any]:
    spec = referencing.jsonschema.specification_with(
        draft.ID_OF(draft.META_SCHEMA), default=referencing.jsonschema.DRAFT202012
    )
    return spec.create_resource(schema)


def check_meta(schema: Any, draft: Any) -> None:
    """`draft.check_schema`, with the `regex` format checked by re2, not by `re`."""
    draft.check_schema(schema, format_checker=_format_checker(draft))


@functools.cache
def _format_checker(draft: Any) -> jsonschema.FormatChecker:
    meta = jsonschema.validators.validator_for(draft.META_SCHEMA, default=draft)
    checker = jsonschema.FormatChecker(formats=())
    checker.checkers.update(meta.FORMAT_CHECKER.checkers)
    checker.checks("regex", raises=UnsafePattern)(_is_safe_regex)
    return checker


# ---------------------------------------------------------------------------------------
# Named schemas and the registry


@functools.cache
def named_schemas() -> Mapping[str, Mapping[str, Any]]:
    """The schemas shipped in `schemas/outputs/`, by file name without `.json`."""
    folder = schemas_dir() / "outputs"
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in folder.glob("*.json")}


def _refuse_retrieval(uri: str) -> referencing.Resource[Any]:
    raise referencing.exceptions.NoSuchResource(ref=uri)  # type: ignore[call-arg]


@functools.cache
def registry() -> referencing.Registry[Any]:
    """The shipped schemas as `urn:tierfleet:output:NAME`, and nothing that can be fetched."""
    resources = [
        (NAMED_SCHEMA_URI_PREFIX + name, referencing.Resource.from_contents(schema))
        for name, schema in named_schemas().items()
    ]
    return referencing.Registry(retrieve=_refuse_retrieval).with_resources(resources).crawl()  # type: ignore[call-arg]


# ---------------------------------------------------------------------------------------
# The validator class


_DEADLINE: ContextVar[float] = ContextVar("tierfleet_validation_deadline", default=math.inf)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Validation in this block raises `DeadlineExceeded` after `seconds`."""
    token = _DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _timed(keyword: Keyword) -> Keyword:
    def check(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        if time.monotonic() > _DEADLINE.get():
            raise DeadlineExceeded
        return keyword(validator, value, instance, schema)

    return check


def _pattern(validator: Any, pattern: Any, instance: Any, schema: Any) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not pattern_search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: Any, instance: Any, _: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if pattern_search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(library: Keyword) -> Keyword:
    """The library's keyword, on the properties no pattern matches (matched by re2)."""

    def check(validator: Any, allowed: Any, instance: Any, schema: Any) -> Any:
        patterns = schema.get("patternProperties")
        if validator.is_type(instance, "object") and isinstance(patterns, dict) and patterns:
            instance = {
                k: v for k, v in instance.items() if not any(pattern_search(p, k) for p in patterns)
            }
            schema = {k: v for k, v in schema.items() if k != "patternProperties"}
        return library(validator, allowed, instance, schema)

    return check


def _canonical(value: Any) -> Any:
    """A hashable form of a JSON value, equal where JSON Schema's equality says so
    (1 == 1.0, True != 1, key order ignored)."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, list):
        return ("array", tuple(_canonical(v) for v in value))
    if isinstance(value, dict):
        return ("object", frozenset((k, _canonical(v)) for k, v in value.items()))
    return ("string", value)


def _unique_items(validator: Any, unique: Any, instance: Any, _: Any) -> Iterator[Any]:
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[Any] = set()
    for item in instance:
        key = _canonical(item)
        if key in seen:
            yield ValidationError(f"{instance!r:.200} has non-unique elements")
            return
        seen.add(key)


@functools.cache
def _safe_class(draft: Any) -> Any:
    replaced: dict[str, Keyword] = {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties(draft.VALIDATORS["additionalProperties"]),
        "uniqueItems": _unique_items,
    }
    keywords = {k: _timed(replaced.get(k, fn)) for k, fn in draft.VALIDATORS.items()}
    return jsonschema.validators.extend(draft, keywords)


def draft_of(schema: Any) -> Any:
    """The jsonschema class of the draft `schema` declares (the latest if none)."""
    return jsonschema.validators.validator_for(schema)


def safe_validator(schema: Any) -> Any:
    """A validator for `schema`: patterns on re2, `uniqueItems` in linear time, every
    keyword under `deadline()`, references resolved only against `registry()`, formats
    not asserted. Raises `UnsafeSchema` for a schema with a pattern re2 cannot run, or
    over the size limits (one that bypassed submission)."""
    check_shape(schema, 0)
    return _safe_class(draft_of(schema))(schema, registry=registry())
