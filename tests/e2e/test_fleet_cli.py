"""`tierfleet fleet show [--json]` and `tierfleet fleet check`: the ladder of the default
fleet and of every example, each rung priced and said ready or not; a bad fleet file is
one line naming the file, the tier and the key, exit 2, never a key."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tierfleet.cli import app
from tierfleet.fleet import load_fleet
from tierfleet.prices import PriceBook
from tierfleet.resources import default_prices_file, examples_dir
from tierfleet.settings import Settings

pytestmark = pytest.mark.e2e
runner = CliRunner()
EXAMPLES = sorted((examples_dir() / "fleets").glob("*.toml"))
KEY = "sk-proj-Zr8Qm2FAKEKEY0123456789abcdef"


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No backend URL or key set, real backends (not simulated)."""
    for name in (
        "VLLM_BASE_URL", "VLLM_API_KEY", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL",
        "OPENAI_API_KEY", "OPENAI_BASE_URL", "TIERFLEET_FLEET_FILE", "TIERFLEET_PRICES_FILE",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TIERFLEET_BACKEND", "real")
    return monkeypatch


def show_json(*args: str) -> list[dict[str, object]]:
    result = runner.invoke(app, ["fleet", "show", "--json", *args])
    assert result.exit_code == 0, result.output
    tiers: list[dict[str, object]] = json.loads(result.output)["tiers"]
    return tiers


def test_the_examples_are_the_ladders_the_readme_names() -> None:
    ladders = {p.stem: [(t.name, t.backend) for t in load_fleet(p)] for p in EXAMPLES}
    assert ladders == {
        "anthropic-only": [("haiku", "anthropic"), ("sonnet", "anthropic"), ("opus", "anthropic")],
        "gpu-and-claude": [("slm", "vllm"), ("haiku", "anthropic"), ("sonnet", "anthropic")],
        "local-and-claude": [("local", "openai"), ("sonnet", "anthropic")],
        "openai": [("mini", "openai"), ("gpt4o", "openai")],
    }
    local = load_fleet(examples_dir() / "fleets" / "local-and-claude.toml").bottom
    assert local.base_url == "http://localhost:11434/v1"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_model_of_every_example_has_a_price_with_its_source_and_date(path: Path) -> None:
    prices = PriceBook.load()
    entries = tomllib.loads(default_prices_file().read_text())["models"]
    for tier in load_fleet(path):
        price = prices[tier.model]  # raises for a model without a price
        assert price.input_usd_per_mtok > 0 and price.output_usd_per_mtok > 0
        assert entries[tier.model]["source"] and entries[tier.model]["as_of"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_check_passes_on_every_example(env: pytest.MonkeyPatch, path: Path) -> None:
    result = runner.invoke(app, ["fleet", "check", "--fleet", str(path)])
    assert result.exit_code == 0, result.output
    assert "every model priced" in result.output


def test_show_json_lists_the_default_ladder_in_order(env: pytest.MonkeyPatch) -> None:
    env.setenv("ANTHROPIC_API_KEY", KEY)
    tiers = show_json()
    assert [(t["name"], t["backend"], t["queue"]) for t in tiers] == [
        ("slm", "vllm", "tier.slm"),
        ("frontier", "anthropic", "tier.frontier"),
    ]
    slm, frontier = tiers
    assert (slm["ready"], slm["missing"]) == (False, "VLLM_BASE_URL")
    assert (frontier["ready"], frontier["missing"]) == (True, "")
    assert (frontier["input_usd_per_mtok"], frontier["output_usd_per_mtok"]) == (3.0, 15.0)
    assert 0 < slm["output_usd_per_mtok"] < 1  # type: ignore[operator]  # GPU hours


def test_show_says_simulated_for_simulated_tiers(env: pytest.MonkeyPatch) -> None:
    env.setenv("TIERFLEET_BACKEND", "sim")
    assert all(t["ready"] and t["simulated"] for t in show_json())
    result = runner.invoke(app, ["fleet", "show"])
    assert result.exit_code == 0 and result.output.count("simulated") == 2, result.output


@pytest.mark.parametrize(
    ("name", "set_env", "expected"),
    [
        (
            "gpu-and-claude",
            {"ANTHROPIC_API_KEY": KEY},
            [("slm", 0.0466, 0.4657, "VLLM_BASE_URL"), ("haiku", 1.0, 5.0, ""),
             ("sonnet", 3.0, 15.0, "")],
        ),
        (
            "anthropic-only",
            {},
            [("haiku", 1.0, 5.0, "ANTHROPIC_API_KEY"), ("sonnet", 3.0, 15.0, "ANTHROPIC_API_KEY"),
             ("opus", 5.0, 25.0, "ANTHROPIC_API_KEY")],
        ),
        (
            "openai",
            {"OPENAI_API_KEY": KEY},
            [("mini", 0.15, 0.6, ""), ("gpt4o", 2.5, 10.0, "")],
        ),
        (  # a local server needs no key; Sonnet does
            "local-and-claude",
            {},
            [("local", 0.108, 1.2963, ""), ("sonnet", 3.0, 15.0, "ANTHROPIC_API_KEY")],
        ),
    ],
)  # fmt: skip
def test_show_prices_each_rung_and_says_what_its_pool_lacks(
    env: pytest.MonkeyPatch,
    name: str,
    set_env: dict[str, str],
    expected: list[tuple[str, float, float, str]],
) -> None:
    for key, value in set_env.items():
        env.setenv(key, value)
    path = str(examples_dir() / "fleets" / f"{name}.toml")
    tiers = show_json("--fleet", path)
    got = [
        (t["name"], t["input_usd_per_mtok"], t["output_usd_per_mtok"], t["missing"]) for t in tiers
    ]
    assert got == [
        (n, pytest.approx(i, abs=1e-4), pytest.approx(o, abs=1e-4), m) for n, i, o, m in expected
    ]
    assert all(t["ready"] is (t["missing"] == "") for t in tiers)
    table = runner.invoke(app, ["fleet", "show", "--fleet", path])
    assert table.exit_code == 0, table.output
    assert path in table.output and "$/Mtok in" in table.output
    for n, _, _, missing in expected:
        assert n in table.output and (not missing or f"needs {missing}" in table.output)
    assert KEY not in table.output + json.dumps(tiers)


GOOD_TOP = '[[tier]]\nname = "top"\nbackend = "anthropic"\nmodel = "claude-sonnet-4-6"\n'


def rung(**keys: object) -> str:
    values = {"name": "low", "backend": "openai", "model": "gpt-4o-mini", **keys}
    lines = [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
             for k, v in values.items() if v is not None]  # fmt: skip
    return "[[tier]]\n" + "\n".join(lines) + "\n"


MISTAKES = {
    "unknown key": (rung(modle="gpt-4o") + GOOD_TOP, "low", "unknown key 'modle'"),
    "wrong type": (rung(concurrency="8") + GOOD_TOP, "low", "concurrency is '8'; give a whole"),
    "unknown backend": (rung(backend="ollama") + GOOD_TOP, "low", "backend 'ollama'"),
    "duplicate name": (rung(name="top") + GOOD_TOP, "top", "name: given to two tiers"),
    "no price": (rung(model="gpt-9") + GOOD_TOP, "low", "model 'gpt-9' has no price"),
    "max_attempts low": (rung(max_attempts=3) + GOOD_TOP, "low", "max_attempts is for the top"),
    "key as api_key_env": (rung(api_key_env=KEY) + GOOD_TOP, "low", "api_key_env looks like a key"),
    "key in api_key": (rung(api_key=KEY) + GOOD_TOP, "low", "unknown key 'api_key'; give the NAME"),
    "model missing": (rung(model=None) + GOOD_TOP, "low", "model is missing"),
    "base_url no scheme": (
        rung(base_url="localhost:11434/v1") + GOOD_TOP,
        "low",
        "base_url 'localhost:11434/v1'",
    ),
    "reserved name": (rung(name="triage") + GOOD_TOP, "triage", "name 'triage' is not a tier"),
    "logprobs on claude": (
        rung() + GOOD_TOP + "logprobs = true\n",
        "top",
        "logprobs: the Anthropic API gives none",
    ),
    "batch on openai": (rung(batch=True) + GOOD_TOP, "low", "batch: provider batches"),
    "queue taken": (rung(queue="tier.top") + GOOD_TOP, "top", "queue 'tier.top' is 'low'"),
    "replicas": (rung(replicas_min=5, replicas_max=2) + GOOD_TOP, "low", "replicas_min (5)"),
}


@pytest.mark.parametrize(("text", "tier", "named"), MISTAKES.values(), ids=MISTAKES.keys())
def test_check_names_the_file_the_tier_and_the_key(
    env: pytest.MonkeyPatch, tmp_path: Path, text: str, tier: str, named: str
) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    line = one_line_error(["fleet", "check", "--fleet", str(path)])
    assert f"fleet file {path}: tier {tier!r}: " in line
    assert named in line


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[[tier]\nname = 'a'\n", "not TOML: "),
        ("[tier]\nname = 'a'\n", "no [[tier]]"),
        ("", "no [[tier]]"),
        (GOOD_TOP + "[pools]\nx = 1\n", "unknown table 'pools'"),
    ],
    ids=["not toml", "a table not an array", "empty", "unknown table"],
)
def test_check_names_the_file_of_a_file_that_is_no_ladder(
    env: pytest.MonkeyPatch, tmp_path: Path, text: str, named: str
) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    line = one_line_error(["fleet", "check", "--fleet", str(path)])
    assert line.startswith(f"error: fleet file {path}: ") and named in line


def test_a_missing_file_is_named_for_check_show_and_the_variable(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "nope.toml"
    for args in (["fleet", "check", "--fleet", str(path)], ["fleet", "show", "--fleet", str(path)]):
        assert f"fleet file {path}: No such file" in one_line_error(args)
    env.setenv("TIERFLEET_FLEET_FILE", str(path))
    assert f"fleet file {path}: No such file" in one_line_error(["fleet", "check"])


def test_check_passes_on_the_default_fleet(env: pytest.MonkeyPatch) -> None:
    result = runner.invoke(app, ["fleet", "check"])
    assert result.exit_code == 0, result.output
    assert "the default fleet: good: 2 tiers (slm, frontier)" in result.output


def one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert KEY not in result.output and "sk-proj" not in result.output
    return lines[0]
