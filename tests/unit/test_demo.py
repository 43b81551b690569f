"""The demo's parts: the simulated models' invalid answers by rung and kind of job, the
ladder the demo picks, and its summary line."""

from __future__ import annotations

import os
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from tierfleet.demo import demo_settings, example_jobs
from tierfleet.demo_report import DemoResult
from tierfleet.envelope import parse_envelope
from tierfleet.errors import InvalidOutput
from tierfleet.report import Row
from tierfleet.settings import Settings
from workers.backends.sim import KIND_ODDS, SimulatedBackend, invalid_chance, rung_invalid_rate
from workers.runtime import make_backends
from workers.validation import validate

API_ONLY = "".join(
    f'[[tier]]\nname = "{name}"\nbackend = "anthropic"\nmodel = "claude-{name}-{v}"\n\n'
    for name, v in (("haiku", "4-5"), ("sonnet", "4-6"), ("opus", "4-6"))
)


@pytest.fixture(autouse=True)
def nothing_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("TIERFLEET_", "ANTHROPIC_", "VLLM_", "OPENAI_")) or key in (
            "DATABASE_URL",
            "REDIS_URL",
        ):
            monkeypatch.delenv(key)


def test_the_kind_of_job_scales_a_rate_and_keeps_never_and_always() -> None:
    kinds = ["classification", "extraction", "summary", "reasoning", "code"]
    chances = [invalid_chance(0.15, kind) for kind in kinds]
    assert chances == sorted(chances) and chances[0] < 0.15 < chances[-1]
    assert invalid_chance(0.15, "summary") == invalid_chance(0.15, None) == 0.15
    assert invalid_chance(0.15, "poetry") == 0.15
    for kind in KIND_ODDS:
        assert invalid_chance(0.0, kind) == 0.0 and invalid_chance(1.0, kind) == 1.0


def test_a_rungs_rate_runs_from_the_bottoms_to_the_tops() -> None:
    assert [rung_invalid_rate(0.2, 0.0, i, 3) for i in range(3)] == [0.2, 0.1, 0.0]
    assert [rung_invalid_rate(0.2, 0.05, i, 2) for i in range(2)] == [0.2, 0.05]
    assert rung_invalid_rate(0.2, 0.05, 0, 1) == 0.05  # a ladder of one rung is its top


def invalid_share(backend: SimulatedBackend, kind: str, n: int = 300) -> float:
    invalid = 0
    for i in range(n):
        job = parse_envelope(
            {"feature": "f", "prompt": f"job {i}", "output_schema": "sentiment",
             "metadata": {"kind": kind}}
        )  # fmt: skip
        try:
            validate(backend.complete(job, timeout_s=1), job.output_schema)
        except InvalidOutput:
            invalid += 1
    return invalid / n


def test_harder_kinds_of_job_get_more_invalid_answers_from_a_simulated_model() -> None:
    backend = SimulatedBackend(tier="slm", model="m", mean_latency_s=0.0, invalid_rate=0.15)
    easy, hard = invalid_share(backend, "classification"), invalid_share(backend, "code")
    assert easy < 0.12 and hard > 0.45


def test_the_simulated_rungs_of_the_default_ladder_keep_their_rates_and_labels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIERFLEET_SIM_INVALID_RATE", "0.3")
    monkeypatch.setenv("TIERFLEET_SIM_FRONTIER_INVALID_RATE", "0.1")
    backends = make_backends(Settings.from_env(), ["slm", "frontier"])
    got = {
        name: (b.invalid_rate, b.provider, b.logprobs)  # type: ignore[attr-defined]
        for name, b in backends.items()
    }
    assert got == {"slm": (0.3, "sim-vllm", True), "frontier": (0.1, "sim-anthropic", False)}


def test_a_middle_rung_is_simulated_between_the_bottom_and_the_top(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "fleet.toml").write_text(API_ONLY)
    monkeypatch.setenv("TIERFLEET_SIM_INVALID_RATE", "0.3")
    monkeypatch.setenv("TIERFLEET_BACKEND", "sim")
    settings = Settings.from_env(fleet_file=tmp_path / "fleet.toml")
    backends = make_backends(settings, settings.fleet.names)
    rates = {name: b.invalid_rate for name, b in backends.items()}  # type: ignore[attr-defined]
    assert rates == {"haiku": 0.3, "sonnet": 0.15, "opus": 0.0}


def test_with_nothing_configured_the_demo_runs_three_simulated_rungs(tmp_path: Path) -> None:
    settings, where = demo_settings(Settings.from_env(), tmp_path)
    assert where == "the demo's ladder"
    assert [(t.name, t.model) for t in settings.fleet] == [
        ("slm", "meta-llama/Meta-Llama-3-8B-Instruct"),
        ("haiku", "claude-haiku-4-5"),
        ("sonnet", "claude-sonnet-4-6"),
    ]
    assert all(settings.simulated(t) for t in settings.fleet)
    assert settings.fleet.top.max_attempts == 2


def test_the_demo_ladders_top_rung_is_the_frontier_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TIERFLEET_FRONTIER_MODEL", "claude-opus-4-6")
    settings, _ = demo_settings(Settings.from_env(), tmp_path)
    assert settings.fleet.names == ("slm", "haiku", "opus")
    assert settings.fleet.top.model == "claude-opus-4-6"


def test_a_configured_model_keeps_the_default_ladder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VLLM_BASE_URL", "http://gpu:8000/v1")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    settings, where = demo_settings(Settings.from_env(), tmp_path)
    assert (settings.fleet.names, where) == (("slm", "frontier"), "the default ladder")
    assert not any(settings.simulated(t) for t in settings.fleet)


def test_a_fleet_file_is_simulated_unless_its_models_are_configured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "api-only.toml"
    path.write_text(API_ONLY)
    settings, where = demo_settings(Settings.from_env(fleet_file=path), tmp_path)
    assert settings.fleet.names == ("haiku", "sonnet", "opus") and str(path) in where
    assert all(settings.simulated(t) for t in settings.fleet)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    settings, _ = demo_settings(Settings.from_env(fleet_file=path), tmp_path)
    assert not any(settings.simulated(t) for t in settings.fleet)


def test_the_examples_routes_name_the_bottom_and_the_top_of_any_ladder() -> None:
    routes = Counter(
        e.get("route") for e in example_jobs(220, "b", ladder=["haiku", "sonnet", "opus"])
    )
    assert set(routes) == {None, "haiku", "opus"}
    default = Counter(e.get("route") for e in example_jobs(220, "b"))
    assert set(default) == {None, "slm", "frontier"}
    assert (routes["haiku"], routes["opus"]) == (default["slm"], default["frontier"])


def test_the_summary_line_ends_with_each_rungs_share_of_finished_jobs() -> None:
    row = Row(jobs=8, succeeded=7, failed=1, escalated=3)
    row.cost_usd, row.baseline_usd = Decimal("0.25"), Decimal("1")
    result = DemoResult(
        ("slm", "haiku", "sonnet"),
        {"code": row},
        finished_on={"code": Counter({"slm": 5, "haiku": 2, "sonnet": 1})},
    )
    assert result.summary_line() == (
        "summary: jobs=8 succeeded=7 failed=1 escalated=3 cost_usd=0.250000 "
        "baseline_usd=1.000000 savings_pct=75.0 tiers=slm:0.625,haiku:0.250,sonnet:0.125"
    )
    nothing = DemoResult(("haiku", "opus"), {})
    assert nothing.summary_line().endswith(" savings_pct=0.0 tiers=haiku:0.000,opus:0.000")
