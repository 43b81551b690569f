"""The FinOps report on a seeded ledger, against figures worked out by hand; and its HTML
page in headless Chromium: it renders, draws its charts, and logs no console error."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import insert
from typer.testing import CliRunner

from tierfleet.cli import app
from tierfleet.constants import JobStatus, Outcome
from tierfleet.db import Ledger
from tierfleet.models import Attempt, Batch, Job
from tierfleet.prices import PriceBook, Usage
from tierfleet.settings import Settings

pytestmark = pytest.mark.integration
runner = CliRunner()
NOW = dt.datetime.now(dt.UTC)
D = Decimal


def seed(ledger: Ledger) -> None:
    """Four jobs of two features, one of them old enough to fall out of a 1-day window:

    - r1 (reviews): slm succeeded, $0.0001, 1,000 in / 100 out tokens
    - r2 (reviews): slm invalid $0.0002 (2,000 / 200), then frontier succeeded $0.0300
    - c1 (code):    frontier failed-attempt $0.0400 then succeeded $0.0500 (routed there)
    - c2 (code):    slm succeeded $0.0003 (3,000 / 300), three days ago
    """
    jobs = [
        ("r1", "reviews", JobStatus.SUCCEEDED, "b1"),
        ("r2", "reviews", JobStatus.SUCCEEDED, "b1"),
        ("c1", "code", JobStatus.SUCCEEDED, None),
        ("c2", "code", JobStatus.SUCCEEDED, None),
    ]
    attempts = [
        ("r1", 1, "slm", Outcome.SUCCEEDED, "0.0001", 1000, 100, 0),
        ("r2", 1, "slm", Outcome.INVALID, "0.0002", 2000, 200, 0),
        ("r2", 2, "frontier", Outcome.SUCCEEDED, "0.0300", 2000, 150, 0),
        ("c1", 1, "frontier", Outcome.INVALID, "0.0400", 4000, 900, 0),
        ("c1", 2, "frontier", Outcome.SUCCEEDED, "0.0500", 4000, 1200, 0),
        ("c2", 1, "slm", Outcome.SUCCEEDED, "0.0003", 3000, 300, 3),
    ]
    with ledger.begin() as conn:
        conn.execute(insert(Batch), [{"id": "b1", "options": {}}])
        conn.execute(
            insert(Job),
            [{"id": j, "feature": f, "status": st, "batch_id": b, "payload": "{}", "route": "auto",
              "latency": "batch", "cost_usd": 0} for j, f, st, b in jobs],
        )  # fmt: skip
        conn.execute(
            insert(Attempt),
            [{"id": str(uuid.uuid4()), "job_id": j, "seq": seq, "tier": tier,
              "model": "m-" + tier, "provider": "p", "outcome": out, "cost_usd": D(cost),
              "input_tokens": tin, "output_tokens": tout, "latency_ms": 100, "feature": "x",
              "started_at": NOW, "created_at": NOW - dt.timedelta(days=days, minutes=5)}
             for j, seq, tier, out, cost, tin, tout, days in attempts],
        )  # fmt: skip


def test_report_figures_equal_the_hand_computed_ones(settings: Settings, ledger: Ledger) -> None:
    seed(ledger)
    frontier = PriceBook.load(settings.prices_file)[settings.model_for("frontier")]
    r1_baseline = frontier.cost_usd(_usage(1000, 100))
    result = runner.invoke(app, ["report", "--since", "1d", "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    reviews, code, total = rep["groups"]["reviews"], rep["groups"]["code"], rep["total"]

    # reviews: spend 0.0001 + 0.0002 + 0.0300; baseline r1 at frontier prices + r2's frontier
    assert D(reviews["spend_usd"]) == D("0.0303")
    assert D(reviews["baseline_usd"]) == r1_baseline + D("0.0300")
    assert reviews["jobs"] == 2 and reviews["succeeded"] == 2
    assert D(reviews["cost_per_succeeded_job_usd"]) == D("0.01515")
    assert reviews["escalation_rate"] == 0.5 and reviews["frontier_share"] == 0.0
    # code: c2 is outside the window; c1 went straight to the frontier
    assert D(code["spend_usd"]) == D("0.0900") and code["jobs"] == 1
    assert D(code["baseline_usd"]) == D("0.0900") and D(code["savings_usd"]) == 0
    assert code["escalation_rate"] == 0.0 and code["frontier_share"] == 1.0
    assert D(total["spend_usd"]) == D("0.1203") and total["jobs"] == 3
    assert D(total["savings_usd"]) == r1_baseline + D("0.1200") - D("0.1203")
    assert total["frontier_share"] == round(1 / 3, 4)
    # reviews escalated half its small-tier jobs: above the 20% threshold
    assert rep["escalation_rate_by_feature"] == {"reviews": 0.5}  # code tried no small tier
    assert len(rep["warnings"]) == 1 and "'reviews'" in rep["warnings"][0]

    by_tier = json.loads(
        runner.invoke(app, ["report", "--since", "1d", "--by", "tier", "--json"]).stdout
    )
    assert D(by_tier["groups"]["slm"]["spend_usd"]) == D("0.0003")
    assert D(by_tier["groups"]["frontier"]["spend_usd"]) == D("0.1200")
    week = json.loads(
        runner.invoke(app, ["report", "--since", "7d", "--by", "batch", "--json"]).stdout
    )
    assert set(week["groups"]) == {"b1", "(no batch)"} and week["total"]["jobs"] == 4


def _usage(tin: int, tout: int) -> Usage:
    return Usage(input_tokens=tin, output_tokens=tout)


def test_report_refuses_bad_options(settings: Settings) -> None:
    assert runner.invoke(app, ["report", "--since", "7 days"]).exit_code == 2
    assert runner.invoke(app, ["report", "--by", "colour"]).exit_code == 2


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is needed (apt-get install chromium)")
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    return path


def test_the_html_report_renders_in_headless_chromium_without_console_errors(
    settings: Settings, ledger: Ledger, tmp_path: Path
) -> None:
    chromium = _chromium()
    seed(ledger)
    page = tmp_path / "report.html"
    result = runner.invoke(app, ["report", "--since", "7d", "--html", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert "<script" not in text and "http://" not in text.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    flags = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
        "--window-size=1000,1600",
    ]  # fmt: skip
    shot = tmp_path / "report.png"
    run = subprocess.run(
        [*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=90
    )
    assert run.returncode == 0, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a page, not a blank
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1000, 1600)
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90
    )
    assert dom.returncode == 0
    assert dom.stdout.count("<svg") == 3 and dom.stdout.count("<rect") > 6
    assert "reviews" in dom.stdout and "saved" in dom.stdout
