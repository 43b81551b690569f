from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from tierfleet.settings import Settings, redact_url

SECRETS = {
    "DATABASE_URL": "postgresql://fleet:pg-Pa55word@db.internal:5432/ledger",
    "REDIS_URL": "redis://:redis-Pa55word@cache.internal:6379/0",
    "ANTHROPIC_API_KEY": "sk-ant-api03-SECRET-KEY",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)


def test_secrets_never_show_in_repr_str_or_logs(
    env: None, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.from_env()
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("settings %s %r", settings, settings)
    shown = repr(settings) + str(settings) + caplog.text + str(settings.model_dump())
    for needle in ("pg-Pa55word", "redis-Pa55word", "SECRET-KEY"):
        assert needle not in shown


def test_connection_urls_are_usable(env: None) -> None:
    settings = Settings.from_env()
    assert settings.database_url_value() == (
        "postgresql+psycopg://fleet:pg-Pa55word@db.internal:5432/ledger"
    )
    assert settings.redis_url_value() == SECRETS["REDIS_URL"]
    assert redact_url(settings.database_url_value() or "") == (
        "postgresql+psycopg://fleet:***@db.internal:5432/ledger"
    )


def test_simulated_backends_are_the_default_without_model_endpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in ("VLLM_BASE_URL", "ANTHROPIC_API_KEY", "TIERFLEET_BACKEND"):
        monkeypatch.delenv(key, raising=False)
    assert Settings.from_env().use_sim_backends
    monkeypatch.setenv("VLLM_BASE_URL", "http://gpu:8000/v1")
    assert not Settings.from_env().use_sim_backends
    monkeypatch.setenv("TIERFLEET_BACKEND", "sim")
    assert Settings.from_env().use_sim_backends


def test_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERFLEET_SIM_LATENCY_S", "0.5")
    monkeypatch.setenv("TIERFLEET_SIM_INVALID_RATE", "0.3")
    monkeypatch.setenv("TIERFLEET_QUEUE_SLM", "gpu.small")
    monkeypatch.setenv("DD_DOGSTATSD_PORT", "9125")
    monkeypatch.setenv("TIERFLEET_PINNED_FEATURES", '{"legal": "frontier"}')
    s = Settings.from_env()
    assert (s.sim_latency_s, s.sim_invalid_rate, s.queue_for("slm"), s.dd_dogstatsd_port) == (
        0.5,
        0.3,
        "gpu.small",
        9125,
    )
    assert s.pinned_features == {"legal": "frontier"}
    assert s.slm_timeout_s(max_tokens=100) == pytest.approx(2.0 + 0.02 * 100)


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("TIERFLEET_SIM_INVALID_RATE", "1.5", "less than or equal to 1"),
        ("TIERFLEET_BACKEND", "gpu", "'auto', 'sim' or 'real'"),
        ("TIERFLEET_PINNED_FEATURES", '{"x": "mid"}', "unknown tier 'mid'"),
        ("TIERFLEET_TRIAGE_THRESHOLD", "high", "valid number"),
    ],
)
def test_bad_settings_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=words):
        Settings.from_env()


def test_visibility_timeout_must_exceed_the_longest_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERFLEET_FRONTIER_TIMEOUT_S", "600")
    monkeypatch.setenv("TIERFLEET_VISIBILITY_TIMEOUT_S", "300")
    with pytest.raises(ValidationError, match="Redis redelivers running jobs"):
        Settings.from_env()


def test_empty_variables_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIERFLEET_BACKEND", raising=False)
    monkeypatch.setenv("VLLM_BASE_URL", "")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "")
    settings = Settings.from_env()
    assert settings.vllm_base_url is None and settings.use_sim_backends


def test_a_copy_with_changes_has_a_ladder_built_from_them() -> None:
    settings = Settings.from_env()
    copy = settings.model_copy(
        update={"slm_timeout_base_s": 0.3, "slm_timeout_per_token_s": 0.0, "scale_slm_max": 4}
    )
    assert copy.fleet.tier("slm").timeout_for(512) == 0.3
    assert copy.fleet.tier("slm").replicas_max == 4
    assert settings.fleet.tier("slm").timeout_for(512) > 0.3  # the original keeps its own
