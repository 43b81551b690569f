"""`tierfleet triage eval --ladder`: the cascade replayed on a small hand-made file whose
figures are worked out by hand, learning online only from what the fleet would observe,
bad rows named by line and field; and the llmrouter data as 8b/50b/70b ladder rows."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tierfleet.cli import app
from workers.router import data
from workers.router.cascade import LadderRow, replay
from workers.router.memory import LocalMemory
from workers.router.router import LearnedRouter

runner = CliRunner()
COST = {"a": 1.0, "b": 2.0, "c": 10.0}
# ok on a, b, c; started on a: tried and paid
ROWS = [
    {"a": True, "b": True, "c": True},  # a answers: $1, ok
    {"a": False, "b": True, "c": True},  # a, b: $3, ok
    {"a": False, "b": False, "c": False},  # a, b, c: $13, not ok (the top's answer is final)
    {"a": False, "b": False, "c": True},  # a, b, c: $13, ok
]


def rows_file(tmp_path: Path, prompt: str = "Sentiment of review {i}: 'fine'") -> Path:
    path = tmp_path / "rows.jsonl"
    lines = [
        {"prompt": prompt.format(i=i), "feature": "reviews", "ok": ok, "cost_usd": COST}
        for i, ok in enumerate(ROWS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_the_replay_of_a_hand_made_ladder(tmp_path: Path) -> None:
    prior = LearnedRouter().prior
    assert all(prior.score(f"Sentiment of review {i}: 'fine'") < 0.5 for i in range(4))
    path = rows_file(tmp_path)  # every row starts on the bottom (below its cold 0.5)
    result = runner.invoke(app, ["triage", "eval", str(path), "--ladder", "a,b,c", "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["router"]["started"] == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert s["finished"] == {"a": 0.25, "b": 0.25, "c": 0.5}
    assert s["router"]["quality"] == 0.75 and s["router"]["cost_usd"] == 30.0  # 1+3+13+13
    assert s["all_top"] == {"started": {"a": 0.0, "b": 0.0, "c": 1.0}, "quality": 0.75,
                            "cost_usd": 40.0}  # fmt: skip
    assert s["always_bottom"]["cost_usd"] == 30.0 and s["always_bottom"]["quality"] == 0.75
    assert s["savings_pct"] == 25.0  # 1 - 30/40
    text = runner.invoke(app, ["triage", "eval", str(path), "--ladder", "a,b,c"]).stdout
    lines = text.strip().splitlines()
    assert "started on: a 100.0%, b 0.0%, c 0.0%" in lines
    assert lines[-1] == "savings_pct: 25.0"


class Starts:
    """A router that starts each row where its prompt says ('start:b')."""

    version = "fixed"

    def __init__(self) -> None:
        self.router = LearnedRouter(memory=LocalMemory())
        self.prior, self.memory = self.router.prior, self.router.memory

    def assess_text(self, text: str, feature: str, key: str, ladder: Any, **_: Any) -> Any:
        from workers.router.router import Assessment

        return Assessment(0.2, 0.2, 0.5, False, "fixed", text.removeprefix("start:"))


def test_a_row_started_higher_pays_only_the_rungs_it_tried_and_online_learns_what_it_saw() -> None:
    rows = [LadderRow(f"start:{s}", "f", ok, COST) for s, ok in zip("bcaa", ROWS, strict=True)]
    stub = Starts()
    summary = replay(rows, "abc", stub, online=True)  # type: ignore[arg-type]
    # b answers row 1 ($2); c row 2 ($10); rows 3 (wrong on every rung), 4 from a ($13 each)
    assert summary.router.cost_usd == 38.0 and summary.router.quality == 0.75
    assert summary.router.started == {"a": 0.5, "b": 0.25, "c": 0.25}
    a, b = stub.memory.stats("f", "a"), stub.memory.stats("f", "b")
    assert (a.n, sum(a.escalated), a.positives) == (2, 2, 1)  # row 3's taken back
    assert (b.n, sum(b.escalated), b.positives) == (3, 2, 1)  # row 1 ok; rows 3, 4 escalated
    assert stub.memory.stats("f", "c").n == 0  # the top is never a label


def test_bad_rows_are_named_by_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    good = {"prompt": "p", "feature": "f", "ok": {"a": True, "b": True}, "cost_usd": COST}
    bad = {**good, "ok": {"a": True, "b": "yes"}}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    result = runner.invoke(app, ["triage", "eval", str(path), "--ladder", "a,b"])
    assert result.exit_code == 2 and "line 3, field 'ok.b': must be a bool" in result.output
    path.write_text(json.dumps([good, {**good, "cost_usd": {"a": 1}}]))  # a JSON array
    result = runner.invoke(app, ["triage", "eval", str(path), "--ladder", "a,b"])
    assert result.exit_code == 2 and "item 2, field 'cost_usd.b': missing" in result.output
    assert runner.invoke(app, ["triage", "eval", str(path), "--ladder", "a"]).exit_code == 2
    two = tmp_path / "two.jsonl"
    two.write_text('{"prompt": "a", "feature": "f", "small_ok": true, "large_ok": false}\n')
    result = runner.invoke(app, ["triage", "eval", str(two), "--ladder", "a,b"])
    assert result.exit_code == 2 and "--ladder needs ladder rows" in result.output


def test_the_ladder_comes_from_the_fleet_file_when_not_given(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        "".join(
            f'[[tier]]\nname = "{n}"\nbackend = "sim"\nmodel = "claude-haiku-4-5"\n' for n in "abc"
        )
    )
    path = rows_file(tmp_path)
    result = runner.invoke(app, ["triage", "eval", str(path), "--fleet", str(fleet), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ladder"] == ["a", "b", "c"]


def test_the_llmrouter_data_as_ladder_rows() -> None:
    if not data.DEFAULT_DIR.is_dir():
        message = f"the routing data is not at {data.DEFAULT_DIR}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    items = json.loads((data.DEFAULT_DIR / "dcrouter_train.json").read_text())[:3]
    with (data.DEFAULT_DIR / "default_query_train.jsonl").open() as f:
        tasks = {q["query"]: q["task_name"] for q in map(json.loads, f)}
    prices = {"8b": 0.18, "50b": 0.18 + 0.70 * 43 / 62, "70b": 0.88}
    models = {"8b": "llama-3.1-8b-instruct", "50b": "llama-3.1-nemotron-51b-instruct",
              "70b": "llama3-chatqa-1.5-70b"}  # fmt: skip
    for item in items:
        row = data.ladder_record(item, tasks[item["question"]])
        assert row["prompt"] == item["question"] and row["feature"] == tasks[item["question"]]
        assert row["ok"] == {r: item["scores"][m] >= 0.5 for r, m in models.items()}
        tokens = len(item["question"]) / 4 + 256
        assert row["cost_usd"] == pytest.approx({r: tokens * p / 1e6 for r, p in prices.items()})


def test_a_missing_data_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dcrouter_train\.json: not found"):
        data.write_ladder(tmp_path / "nowhere", tmp_path / "rows.jsonl")
