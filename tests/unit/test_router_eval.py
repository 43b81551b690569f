"""`tierfleet triage eval` on the held-out fifth of the public routing data (split by
prompt, seed `workers.router.data.SEED`), the prior alone and replayed online with the
task name as the feature. The floors are the figures the shipped model reaches, less a
little: a retrained or changed router that routes worse fails here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tierfleet.cli import app
from workers.router import data

runner = CliRunner()


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not data.DEFAULT_DIR.is_dir():
        message = f"the routing data is not at {data.DEFAULT_DIR}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    rows = data.load(data.DEFAULT_DIR)
    train, held = data.split(rows)
    assert len(held) / len(rows) == pytest.approx(0.2, abs=0.01)
    assert not {r.prompt for r in train} & {r.prompt for r in held}  # split by prompt
    path = tmp_path_factory.mktemp("router") / "held_out.jsonl"
    data.write_eval(held, path)
    return path


def test_the_prior_alone_on_the_held_out_prompts(held_out: Path) -> None:
    result = runner.invoke(app, ["triage", "eval", str(held_out)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("apgr: ")
    assert any(line.startswith("cpt(50%): ") for line in lines)
    summary = json.loads(runner.invoke(app, ["triage", "eval", str(held_out), "--json"]).stdout)
    assert summary["auroc"] >= 0.65
    assert summary["apgr"] >= 0.56  # random: 0.5
    assert float(lines[-1].split()[-1]) == pytest.approx(summary["apgr"], abs=5e-4)


def test_learning_online_from_the_fleet_s_outcomes_beats_the_prior(held_out: Path) -> None:
    prior = json.loads(runner.invoke(app, ["triage", "eval", str(held_out), "--json"]).stdout)
    result = runner.invoke(app, ["triage", "eval", str(held_out), "--online", "--json"])
    assert result.exit_code == 0, result.output
    online = json.loads(result.stdout)
    assert online["online"] and 0 < online["sent_small"] < online["rows"]
    assert online["apgr"] >= 0.62 and online["apgr"] > prior["apgr"] + 0.04
    assert online["auroc"] > prior["auroc"]


def test_eval_names_the_bad_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"prompt": "a", "feature": "f", "small_ok": true, "large_ok": true}\n'
        '{"prompt": "b", "feature": "f", "small_ok": "yes", "large_ok": true}\n'
    )
    result = runner.invoke(app, ["triage", "eval", str(path)])
    assert result.exit_code == 2
    assert "line 2, field 'small_ok': must be a bool" in result.output
    path.write_text('{"prompt": "a", "feature": "f", "small_ok": true, "large_ok": true}\n')
    result = runner.invoke(app, ["triage", "eval", str(path)])
    assert result.exit_code == 2 and "no gap to recover" in result.output
    both = ["triage", "eval", str(path), "--frontier-share", "0.2", "--max-escalation-rate", "0.1"]
    assert runner.invoke(app, both).exit_code == 2
    assert runner.invoke(app, ["triage", "eval", str(tmp_path / "none.jsonl")]).exit_code == 2


def test_costs_are_reported_when_the_rows_carry_them(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"Sentiment {i}: fine", "feature": "f", "small_ok": i % 3 != 0,
         "large_ok": True, "small_cost": 0.0001, "large_cost": 0.003}
        for i in range(30)
    ]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads(runner.invoke(app, ["triage", "eval", str(path), "--json"]).stdout)
    assert summary["cost"]["cost_per_row_all_frontier_usd"] == pytest.approx(0.003)
    assert 0 < summary["cost"]["cost_per_row_at_cpt80_usd"] <= 0.003 + 0.0001
