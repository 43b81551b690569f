"""The README's configuration table and compose.yaml stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tierfleet.settings import Settings, env_names
from workers.app import POOLS

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", table, re.MULTILINE))
    assert documented == set(env_names().values())


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_compose_runs_one_worker_per_pool_and_migrates_first() -> None:
    services = compose()["services"]
    pools = {}
    for name, svc in services.items():
        command = svc.get("command", [])
        if command[:1] == ["worker"]:
            pools[command[command.index("--pool") + 1]] = name
            assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert set(pools) == set(POOLS) - {"all"}
    assert services["migrate"]["command"] == ["db", "upgrade"]
    beats = [name for name, svc in services.items() if svc.get("command") == ["beat"]]
    assert beats == ["beat"]  # the reconciler's clock: exactly one
    assert services["beat"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "noeviction"


def test_compose_sets_only_settings_the_code_reads() -> None:
    known = set(env_names().values()) | {"TIERFLEET_LOG_LEVEL"}
    for name, svc in compose()["services"].items():
        if "build" not in svc:
            continue
        for key in svc.get("environment", {}):
            assert key in known, f"compose service {name!r} sets unknown {key}"


def test_compose_environment_builds_valid_settings(monkeypatch: Any) -> None:
    env = compose()["services"]["slm"]["environment"]
    for key, value in env.items():
        monkeypatch.setenv(key, re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value)))
    settings = Settings.from_env()
    assert settings.use_sim_backends  # no VLLM_BASE_URL given: simulated
    assert settings.database_url_value() is not None
