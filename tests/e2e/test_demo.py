"""`tierfleet demo` on its ladders: the default three simulated rungs, an API-only fleet
file, and a bad one. Each run is the real command in its own process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SUMMARY = re.compile(
    r"^summary: jobs=(\d+) succeeded=(\d+) failed=(\d+) escalated=(\d+) "
    r"cost_usd=([\d.]+) baseline_usd=([\d.]+) savings_pct=(-?[\d.]+) "
    r"tiers=((?:[a-z][a-z0-9_]*:[\d.]+)(?:,[a-z][a-z0-9_]*:[\d.]+)*)$"
)
API_ONLY = """
[[tier]]
name = "haiku"
backend = "anthropic"
model = "claude-haiku-4-5"

[[tier]]
name = "sonnet"
backend = "anthropic"
model = "claude-sonnet-4-6"

[[tier]]
name = "opus"
backend = "anthropic"
model = "claude-opus-4-6"
"""


def bare_env() -> dict[str, str]:
    """Nothing configured: no services, no keys, fast simulated models."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL")
        and not k.startswith(("TIERFLEET_", "ANTHROPIC_", "VLLM_", "OPENAI_"))
    }
    env["TIERFLEET_SIM_LATENCY_S"] = "0.01"
    return env


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierfleet", "demo", *args],
        env=bare_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def shares(proc: subprocess.CompletedProcess[str]) -> dict[str, float]:
    assert proc.returncode == 0, proc.stderr
    match = SUMMARY.match(proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout[-500:]
    jobs, ok, failed = (int(g) for g in match.groups()[:3])
    assert ok + failed == jobs
    pairs = (part.split(":") for part in match.group(8).split(","))
    return {tier: float(share) for tier, share in pairs}


def routing(stdout: str, ladder: list[str]) -> dict[str, dict[str, int]]:
    """The routing table's rows: kind → jobs, start TIER, end TIER, climbed, failed."""
    table = stdout.split("started and finished on the ladder", 1)[1].split("Climbs", 1)[0]
    names = ["jobs", *(f"start {t}" for t in ladder), *(f"end {t}" for t in ladder)]
    names += ["climbed", "failed"]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if line.startswith("│") and cells[0] and cells[0] != "kind":
            rows[cells[0]] = dict(zip(names, map(int, cells[1:]), strict=True))
    return rows


def test_the_default_demo_climbs_three_simulated_rungs_by_kind_of_job() -> None:
    proc = demo("--jobs", "120")
    by_tier = shares(proc)
    assert list(by_tier) == ["slm", "haiku", "sonnet"]
    assert abs(sum(by_tier.values()) - 1) <= 0.002
    assert all(share > 0 for share in by_tier.values()), by_tier
    assert "SIMULATED" in proc.stdout
    assert "1. slm: meta-llama/Meta-Llama-3-8B-Instruct (simulated vllm;" in proc.stdout
    assert "2. haiku: claude-haiku-4-5 (simulated anthropic;" in proc.stdout
    assert "3. sonnet: claude-sonnet-4-6 (simulated anthropic; 0% of answers" in proc.stdout

    rows = routing(proc.stdout, ["slm", "haiku", "sonnet"])
    every = rows.pop("all")
    assert every["jobs"] == 120
    # Climbing: more jobs end on haiku than start there, so some failed on slm first.
    assert every["end haiku"] > every["start haiku"]
    climbs = re.search(r"slm → haiku: (\d+); haiku → sonnet: (\d+)", proc.stdout)
    assert climbs and int(climbs.group(1)) > 0

    def low(kinds: tuple[str, ...]) -> float:
        jobs = sum(rows[k]["jobs"] for k in kinds)
        return sum(rows[k]["end slm"] for k in kinds) / jobs

    mechanical, hard = low(("classification", "extraction")), low(("code", "reasoning"))
    assert mechanical >= 0.75, rows
    assert hard <= 0.5 and hard < mechanical - 0.3, rows


def test_a_rerun_prints_the_same_table() -> None:
    first, second = (demo("--jobs", "60", "--concurrency", "1") for _ in range(2))
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr

    def report(proc: subprocess.CompletedProcess[str]) -> str:
        return proc.stdout[proc.stdout.index("Where each kind") :]

    assert report(first) == report(second)
    assert shares(first) == shares(second)


def test_an_api_only_fleet_file_runs_simulated_with_no_gpu_rung(tmp_path: Path) -> None:
    fleet = tmp_path / "api-only.toml"
    fleet.write_text(API_ONLY)
    proc = demo("--jobs", "60", "--fleet", str(fleet))
    by_tier = shares(proc)
    assert list(by_tier) == ["haiku", "sonnet", "opus"]
    assert abs(sum(by_tier.values()) - 1) <= 0.002
    assert "SIMULATED" in proc.stdout and "no GPU rung" in proc.stdout
    report = proc.stdout[proc.stdout.index("Where each kind") :]
    assert "slm" not in report
    rows = routing(proc.stdout, ["haiku", "sonnet", "opus"])
    assert rows["all"]["jobs"] == 60
    assert "all-opus $" in report


def test_a_bad_fleet_file_is_one_line_naming_it_and_exit_2(tmp_path: Path) -> None:
    fleet = tmp_path / "bad.toml"
    fleet.write_text('[[tier]]\nname = "gpu"\nbackend = "vllm"\nmodel = "m"\nconcurrency = 0\n')
    proc = demo("--jobs", "3", "--fleet", str(fleet))
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert lines == [f"error: fleet file {fleet}: tier 'gpu': concurrency is 0; give at least 1"]
