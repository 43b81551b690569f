"""The ladder: the tiers a job can run on, cheapest first, each a model on its own pool.

A fleet file (TOML, `TIERFLEET_FLEET_FILE`) lists them in ladder order:

    [[tier]]
    name = "haiku"              # also the pool: tierfleet worker --pool haiku
    backend = "anthropic"       # vllm | openai | anthropic | sim
    model = "claude-haiku-4-5"  # must have a price in the price book

    [[tier]]
    name = "sonnet"
    backend = "anthropic"
    model = "claude-sonnet-4-6"
    max_attempts = 2            # the top rung's tries at a valid answer

Without a file the ladder is the two tiers the settings describe (`slm` on vLLM, then
`frontier` on Anthropic), with today's environment variables. Triage picks the rung a job
starts on; an answer that fails validation climbs one rung; the top rung gets its
`max_attempts`. A bad file is refused when the settings are built, naming the file, the
tier and the key.

A tier names the variable that holds its key (`api_key_env`), never the key itself.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, get_args
from urllib.parse import urlsplit

from tierfleet import constants as C
from tierfleet.errors import ConfigurationError

if TYPE_CHECKING:
    from tierfleet.settings import Settings

BackendKind = Literal["vllm", "openai", "anthropic", "sim"]
BACKENDS: Final[tuple[str, ...]] = get_args(BackendKind)
NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # the envelope's `route` pattern
RESERVED: Final = frozenset({"triage", "all", C.ROUTE_AUTO})  # pool names and `auto`

# Where a backend finds its key and its URL when the tier does not say.
DEFAULT_KEY_ENV: Final[Mapping[str, str | None]] = {
    "vllm": "VLLM_API_KEY",
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "sim": None,
}
DEFAULT_URL_ENV: Final[Mapping[str, str | None]] = {
    "vllm": "VLLM_BASE_URL",
    "openai": "OPENAI_BASE_URL",
    "anthropic": "ANTHROPIC_BASE_URL",
    "sim": None,
}


@dataclass(frozen=True, slots=True)
class Tier:
    """One rung: a model on a backend, with its queue, pool size, timeouts and limits."""

    name: str
    backend: BackendKind
    model: str
    base_url: str | None = None  # None: the backend's variable (VLLM_BASE_URL, ...)
    api_key_env: str | None = None  # None: the backend's variable (ANTHROPIC_API_KEY, ...)
    queue: str = ""  # "" : tier.NAME
    concurrency: int = 32  # requests in flight per worker process
    timeout_s: float = 120.0  # a call's timeout: timeout_s + timeout_per_token_s * max_tokens
    timeout_per_token_s: float = 0.0
    max_attempts: int = 2  # tries at a valid answer, on the top rung
    context_tokens: int | None = None  # a prompt and answer that do not fit start above
    logprobs: bool = False  # ask for token logprobs (and apply TIERFLEET_MIN_MEAN_LOGPROB)
    batch: bool = False  # provider batches for `latency: batch` jobs
    replicas_min: int = 0  # what `tierfleet scale` may ask of this pool
    replicas_max: int = 20

    def __post_init__(self) -> None:
        if not self.queue:
            object.__setattr__(self, "queue", f"tier.{self.name}")
        if self.api_key_env is None and not (
            self.backend == "openai" and self.base_url and not is_openai_api(self.base_url)
        ):  # OPENAI_API_KEY goes to OpenAI only, never to another server by default
            object.__setattr__(self, "api_key_env", DEFAULT_KEY_ENV[self.backend])

    @property
    def url_env(self) -> str | None:
        """The variable the base URL comes from when the tier gives none."""
        return None if self.base_url else DEFAULT_URL_ENV[self.backend]

    @property
    def batches_queue(self) -> str:
        """The queue of this tier's provider-batch task (sent by beat when `batch`)."""
        return f"{C.QUEUE_BATCHES}.{self.name}"

    def timeout_for(self, max_tokens: int) -> float:
        return self.timeout_s + self.timeout_per_token_s * max_tokens

    def fits(self, tokens: int) -> bool:
        return self.context_tokens is None or tokens <= self.context_tokens


@dataclass(frozen=True, slots=True)
class Fleet:
    """The ladder, cheapest first. `source` is the fleet file, or None for the default."""

    tiers: tuple[Tier, ...]
    source: Path | None = None
    _by_name: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ConfigurationError(f"{self._where()}: the ladder has no [[tier]]")
        by_name: dict[str, int] = {}
        queues: dict[str, str] = {}
        for i, tier in enumerate(self.tiers):
            where = f"{self._where()}: tier {tier.name!r}"
            if tier.name in by_name:
                raise ConfigurationError(f"{where}: name: given to two tiers")
            if tier.queue in queues or tier.queue in (C.QUEUE_TRIAGE, C.QUEUE_CONTROL):
                other = queues.get(tier.queue, "triage")
                raise ConfigurationError(f"{where}: queue {tier.queue!r} is {other!r}'s too")
            by_name[tier.name] = i
            queues[tier.queue] = tier.name
        object.__setattr__(self, "_by_name", by_name)

    def _where(self) -> str:
        return f"fleet file {self.source}" if self.source else "the default fleet"

    # --- reading the ladder ------------------------------------------------------------

    def __iter__(self) -> Iterator[Tier]:
        return iter(self.tiers)

    def __len__(self) -> int:
        return len(self.tiers)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    @property
    def bottom(self) -> Tier:
        return self.tiers[0]

    @property
    def top(self) -> Tier:
        return self.tiers[-1]

    def tier(self, name: str) -> Tier:
        """The tier called `name`; a `ConfigurationError` naming the valid ones if none."""
        try:
            return self.tiers[self._by_name[name]]
        except KeyError:
            raise ConfigurationError(
                f"unknown tier {name!r}; tiers are {', '.join(self.names)}"
            ) from None

    def index(self, name: str) -> int:
        self.tier(name)
        return self._by_name[name]

    def above(self, name: str) -> Tier | None:
        """The next rung up, or None on the top rung."""
        i = self.index(name) + 1
        return self.tiers[i] if i < len(self.tiers) else None

    def is_top(self, name: str) -> bool:
        return name == self.tiers[-1].name

    def queue_for(self, name: str) -> str:
        return self.tier(name).queue

    def model_for(self, name: str) -> str:
        return self.tier(name).model

    def tier_of_queue(self, queue: str) -> Tier | None:
        return next((t for t in self.tiers if t.queue == queue), None)

    def with_backend(self, backend: BackendKind) -> Fleet:
        """The same ladder with every rung on `backend` (`sim`: the demo, TIERFLEET_BACKEND=sim)."""
        return replace(self, tiers=tuple(replace(t, backend=backend) for t in self.tiers))


# --- the default ladder --------------------------------------------------------------------


def default_fleet(settings: Settings) -> Fleet:
    """The two tiers the settings describe: Llama 3 8B on vLLM, then Claude."""
    slm = Tier(
        name=C.TIER_SLM,
        backend="vllm",
        model=settings.slm_model,
        base_url=settings.vllm_base_url,
        queue=settings.queue_slm,
        concurrency=settings.slm_concurrency,
        timeout_s=settings.slm_timeout_base_s,
        timeout_per_token_s=settings.slm_timeout_per_token_s,
        context_tokens=settings.slm_context_tokens,
        logprobs=True,
        replicas_min=settings.scale_slm_min,
        replicas_max=settings.scale_slm_max,
    )
    frontier = Tier(
        name=C.TIER_FRONTIER,
        backend="anthropic",
        model=settings.frontier_model,
        base_url=settings.anthropic_base_url,
        queue=settings.queue_frontier,
        concurrency=settings.frontier_concurrency,
        timeout_s=settings.frontier_timeout_s,
        max_attempts=settings.frontier_max_attempts,
        batch=settings.message_batches != "off",
        replicas_min=settings.scale_frontier_min,
        replicas_max=settings.scale_frontier_max,
    )
    return Fleet((slm, frontier))


# --- the fleet file ------------------------------------------------------------------------

_KEYS: Final[Mapping[str, type | tuple[type, ...]]] = {
    "name": str,
    "backend": str,
    "model": str,
    "base_url": str,
    "api_key_env": str,
    "queue": str,
    "concurrency": int,
    "timeout_s": (int, float),
    "timeout_per_token_s": (int, float),
    "max_attempts": int,
    "context_tokens": int,
    "logprobs": bool,
    "batch": bool,
    "replicas_min": int,
    "replicas_max": int,
}
_REQUIRED: Final = ("name", "backend", "model")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# How provider keys begin (OpenAI, Anthropic, Groq, Hugging Face, xAI, AWS, GitHub ...).
_KEY_LIKE = re.compile(r"^(sk-|sk_|gsk_|hf_|xai-|AKIA|ghp_|github_pat_|Bearer\s)")
_QUEUE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def load_fleet(path: Path) -> Fleet:
    """Read and check a fleet file; a `ConfigurationError` names the file, the tier and
    the key of the first problem."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"fleet file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"fleet file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"fleet file {path}: not TOML: {exc}") from None
    return parse_fleet(doc, source=path)


def parse_fleet(doc: Mapping[str, Any], *, source: Path | None = None) -> Fleet:
    where = f"fleet file {source}" if source else "fleet"
    extra = set(doc) - {"tier"}
    if extra:
        raise ConfigurationError(f"{where}: unknown table {sorted(extra)[0]!r}; give [[tier]]")
    raw = doc.get("tier")
    if not isinstance(raw, list) or not raw:
        raise ConfigurationError(f"{where}: no [[tier]]; list the ladder, cheapest first")
    tiers = []
    for i, entry in enumerate(raw):
        at = f"{where}: tier {i + 1}"
        if not isinstance(entry, dict):
            raise ConfigurationError(f"{at}: each tier is a [[tier]] table")
        if isinstance(entry.get("name"), str):
            at = f"{where}: tier {entry['name']!r}"
        tiers.append(_tier(entry, at, top=i == len(raw) - 1))
    return Fleet(tuple(tiers), source)


def _tier(entry: Mapping[str, Any], at: str, *, top: bool) -> Tier:
    for key, value in entry.items():
        if key not in _KEYS:
            hint = (
                "; give the NAME of the variable that holds the key as api_key_env"
                if key in ("api_key", "key", "token", "secret")
                else f"; keys are {', '.join(_KEYS)}"
            )
            raise ConfigurationError(f"{at}: unknown key {key!r}{hint}")
        kind = _KEYS[key]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            want = "a number" if key.startswith("timeout") else _type_name(kind)
            raise ConfigurationError(f"{at}: {key} is {value!r}; give {want}")
    for key in _REQUIRED:
        if key not in entry:
            raise ConfigurationError(f"{at}: {key} is missing")
    name, backend, model = entry["name"], entry["backend"], entry["model"]
    if not NAME.match(name) or name in RESERVED:
        raise ConfigurationError(
            f"{at}: name {name!r} is not a tier name: lowercase letters, digits and _, "
            "starting with a letter, at most 32 (and not triage, all or auto)"
        )
    if backend not in BACKENDS:
        raise ConfigurationError(f"{at}: backend {backend!r}; give one of {', '.join(BACKENDS)}")
    if not model.strip():
        raise ConfigurationError(f"{at}: model is empty")
    env = entry.get("api_key_env")
    if env is not None and (_KEY_LIKE.match(env) or not _ENV_NAME.match(env)):
        what = "looks like a key, not" if _KEY_LIKE.match(env) or len(env) >= 32 else "is not"
        raise ConfigurationError(  # the value is never shown: it may be a key
            f"{at}: api_key_env {what} a variable name: give the NAME of the variable "
            'that holds the key (e.g. api_key_env = "OPENAI_API_KEY") and keep the key '
            "in the environment"
        )
    url = entry.get("base_url")
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"{at}: base_url {url!r} is not an http(s):// URL")
    queue = entry.get("queue")
    if queue is not None and not _QUEUE.match(queue):
        raise ConfigurationError(f"{at}: queue {queue!r}: letters, digits and _.:-, at most 128")
    for key in ("concurrency", "max_attempts", "context_tokens", "replicas_max"):
        if key in entry and entry[key] < 1:
            raise ConfigurationError(f"{at}: {key} is {entry[key]}; give at least 1")
    for key in ("timeout_per_token_s", "replicas_min"):
        if key in entry and entry[key] < 0:
            raise ConfigurationError(f"{at}: {key} is {entry[key]}; give 0 or more")
    if "timeout_s" in entry and entry["timeout_s"] <= 0:
        raise ConfigurationError(f"{at}: timeout_s is {entry['timeout_s']}; give more than 0")
    if "max_attempts" in entry and not top:
        raise ConfigurationError(
            f"{at}: max_attempts is for the top rung; a lower rung's invalid answer climbs"
        )
    if entry.get("logprobs") and backend == "anthropic":
        raise ConfigurationError(f"{at}: logprobs: the Anthropic API gives none")
    if entry.get("batch") and backend not in ("anthropic", "sim"):
        raise ConfigurationError(
            f"{at}: batch: provider batches are run on anthropic tiers; {backend} has none here"
        )
    defaults = _BACKEND_DEFAULTS[backend]
    values = {**defaults, **entry}
    if values["replicas_min"] > values["replicas_max"]:
        raise ConfigurationError(
            f"{at}: replicas_min ({values['replicas_min']}) is above replicas_max "
            f"({values['replicas_max']})"
        )
    values["timeout_s"] = float(values["timeout_s"])
    values["timeout_per_token_s"] = float(values["timeout_per_token_s"])
    return Tier(**values)


# A self-hosted rung answers fast or not at all (its timeout grows with the answer), and
# its pool keeps a GPU warm; an API rung waits longer and scales to zero.
_BACKEND_DEFAULTS: Final[Mapping[str, Mapping[str, Any]]] = {
    "vllm": {
        "timeout_s": 2.0, "timeout_per_token_s": 0.02, "context_tokens": 8192,
        "logprobs": True, "replicas_min": 1, "replicas_max": 8,
    },
    "openai": {
        "timeout_s": 120.0, "timeout_per_token_s": 0.0, "replicas_min": 0, "replicas_max": 20,
    },
    "anthropic": {
        "timeout_s": 120.0, "timeout_per_token_s": 0.0, "replicas_min": 0, "replicas_max": 20,
    },
    "sim": {
        "timeout_s": 120.0, "timeout_per_token_s": 0.0, "replicas_min": 0, "replicas_max": 20,
    },
}  # fmt: skip


def is_openai_api(base_url: str | None) -> bool:
    """Whether an `openai` rung at `base_url` is on OpenAI's own API (None: the SDK's
    default URL, which is)."""
    return base_url is None or urlsplit(base_url).hostname == "api.openai.com"


def pool_needs(tier: Tier, *, base_url: str | None, has_key: bool) -> str | None:
    """What `tier`'s pool lacks to start (None: nothing): a vllm rung its server's URL,
    an anthropic rung, or an openai rung on OpenAI's API, its key. (A compatible server
    may check no key.)"""
    if tier.backend == "vllm" and not base_url:
        return tier.url_env or "base_url"
    key_needed = tier.backend == "anthropic" or (
        tier.backend == "openai" and is_openai_api(base_url)
    )
    if key_needed and not has_key:
        return tier.api_key_env or "api_key_env"
    return None


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "a whole number", bool: "true or false", float: "a number"}
    return names[kind] if isinstance(kind, type) else "a number"
