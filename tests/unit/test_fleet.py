"""The fleet file's parser and the ladder it builds: defaults per backend, the ladder's
questions (above, top, queue), and the mistakes it refuses, each naming tier and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tierfleet.errors import ConfigurationError
from tierfleet.fleet import Fleet, Tier, is_openai_api, load_fleet, parse_fleet, pool_needs


def ladder(*tiers: dict[str, Any]) -> Fleet:
    return parse_fleet({"tier": list(tiers)}, source=Path("f.toml"))


VLLM = {"name": "slm", "backend": "vllm", "model": "meta-llama/Meta-Llama-3-8B-Instruct"}
MINI = {"name": "mini", "backend": "openai", "model": "gpt-4o-mini"}
SONNET = {"name": "sonnet", "backend": "anthropic", "model": "claude-sonnet-4-6"}


def test_each_backend_has_its_defaults_and_a_tier_its_queue_and_key_variable() -> None:
    slm, mini, sonnet = ladder(VLLM, MINI, SONNET)
    assert (slm.queue, slm.api_key_env, slm.url_env) == (
        "tier.slm",
        "VLLM_API_KEY",
        "VLLM_BASE_URL",
    )
    assert (slm.timeout_s, slm.timeout_per_token_s, slm.logprobs) == (2.0, 0.02, True)
    assert slm.timeout_for(100) == pytest.approx(4.0) and slm.fits(8192) and not slm.fits(8193)
    assert (mini.api_key_env, mini.url_env, mini.logprobs) == (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        False,
    )
    assert (sonnet.api_key_env, sonnet.timeout_s, sonnet.max_attempts) == (
        "ANTHROPIC_API_KEY",
        120.0,
        2,
    )
    assert (mini.replicas_min, slm.replicas_min) == (0, 1)


def test_given_values_win_and_whole_seconds_are_read_as_seconds() -> None:
    [tier] = ladder(
        {**MINI, "queue": "q.mini", "timeout_s": 30, "api_key_env": "MY_OPENAI_KEY",
         "base_url": "http://localhost:11434/v1", "max_attempts": 4}
    )  # fmt: skip
    assert tier == Tier(
        name="mini", backend="openai", model="gpt-4o-mini", queue="q.mini", timeout_s=30.0,
        api_key_env="MY_OPENAI_KEY", base_url="http://localhost:11434/v1", max_attempts=4,
    )  # fmt: skip
    assert isinstance(tier.timeout_s, float) and tier.url_env is None


def test_the_ladder_answers_which_rung_is_above_and_which_is_top() -> None:
    fleet = ladder(VLLM, MINI, SONNET)
    assert fleet.names == ("slm", "mini", "sonnet") and len(fleet) == 3
    assert fleet.above("slm") == fleet.tier("mini") and fleet.above("sonnet") is None
    assert fleet.is_top("sonnet") and not fleet.is_top("slm")
    assert (fleet.bottom.name, fleet.top.name, fleet.index("mini")) == ("slm", "sonnet", 1)
    assert fleet.tier_of_queue("tier.mini") == fleet.tier("mini")
    assert fleet.tier_of_queue("tier.nope") is None and "mini" in fleet
    with pytest.raises(
        ConfigurationError, match="unknown tier 'opus'; tiers are slm, mini, sonnet"
    ):
        fleet.tier("opus")
    assert {t.backend for t in fleet.with_backend("sim")} == {"sim"}


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({**MINI, "api_key_env": "sk-proj-abc123"}, "tier 'mini': api_key_env looks like a key"),
        ({**MINI, "api_key_env": "sk_live_abc123"}, "tier 'mini': api_key_env looks like a key"),
        ({**MINI, "api_key_env": "my key"}, "tier 'mini': api_key_env is not a variable name"),
        ({**MINI, "concurrency": True}, "tier 'mini': concurrency is True; give a whole number"),
        ({**MINI, "timeout_s": "30s"}, "tier 'mini': timeout_s is '30s'; give a number"),
        ({**MINI, "timeout_s": 0}, "tier 'mini': timeout_s is 0; give more than 0"),
        ({**MINI, "concurrency": 0}, "tier 'mini': concurrency is 0; give at least 1"),
        ({**MINI, "name": "Mini"}, "tier 'Mini': name 'Mini' is not a tier name"),
        ({**MINI, "model": " "}, "tier 'mini': model is empty"),
        ({**MINI, "queue": "a queue"}, "tier 'mini': queue 'a queue'"),
        ({"backend": "openai", "model": "m"}, "tier 1: name is missing"),
        ({**MINI, "secret": "x"}, "unknown key 'secret'; give the NAME of the variable"),
    ],
)
def test_a_bad_tier_is_refused_naming_the_file_the_tier_and_the_key(
    entry: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        ladder(entry, SONNET)
    message = str(caught.value)
    assert message.startswith("fleet file f.toml: ") and named in message
    assert "sk-proj-abc123" not in message and "sk_live_abc123" not in message


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_bytes(b"\xff\xfe[[tier]]")
    with pytest.raises(ConfigurationError, match=f"fleet file {path}: not UTF-8 text"):
        load_fleet(path)


def test_what_a_pool_needs_to_start() -> None:
    slm, mini, sonnet = ladder(VLLM, MINI, SONNET)
    local = Tier(name="local", backend="openai", model="m", base_url="http://localhost:11434/v1")
    assert pool_needs(slm, base_url=None, has_key=False) == "VLLM_BASE_URL"
    assert pool_needs(slm, base_url="http://vllm:8000/v1", has_key=False) is None
    assert pool_needs(mini, base_url=None, has_key=False) == "OPENAI_API_KEY"
    assert pool_needs(mini, base_url="https://api.openai.com/v1", has_key=False) == "OPENAI_API_KEY"
    assert pool_needs(local, base_url=local.base_url, has_key=False) is None
    assert pool_needs(sonnet, base_url=None, has_key=False) == "ANTHROPIC_API_KEY"
    assert pool_needs(sonnet, base_url=None, has_key=True) is None
    assert is_openai_api(None) and not is_openai_api("http://api.openai.com.evil.test/v1")


def test_an_openai_key_goes_to_openais_api_only_unless_a_tier_names_it() -> None:
    fleet = parse_fleet(
        {
            "tier": [
                {"name": "local", "backend": "openai", "model": "m", "base_url": "http://h:1/v1"},
                {"name": "named", "backend": "openai", "model": "m", "base_url": "http://h:1/v1",
                 "api_key_env": "OPENAI_API_KEY"},
                {"name": "mini", "backend": "openai", "model": "gpt-4o-mini"},
            ]
        }
    )  # fmt: skip
    assert [t.api_key_env for t in fleet] == [None, "OPENAI_API_KEY", "OPENAI_API_KEY"]
