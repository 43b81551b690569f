"""Teams are kept apart on every path into the fleet: through `POST /v1/jobs` and through
the lines of an uploaded batch file, one team can neither take, nor learn of, another's
idempotency keys and job ids, nor spend another's feature budget; and a team name cannot
be one that makes two teams' names meet. Real server, Redis, Postgres and workers."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from sqlalchemy import select, update
from typer.testing import CliRunner

from tests.conftest import Workers, wait_until
from tests.e2e.conftest import Api
from tests.e2e.test_fleet import all_terminal
from tierfleet.cli import app as cli
from tierfleet.models import ApiToken, BudgetSpend, Job

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]
runner = CliRunner()


def sdk(api: Api, token: str) -> OpenAI:
    return OpenAI(base_url=f"{api.url}/v1", api_key=token, max_retries=0)


def line(custom_id: str, **fields: Any) -> dict[str, Any]:
    """A batch line in tierfleet's own envelope (a custom_id in its metadata)."""
    return {"prompt": f"Label this review: {custom_id}", "output_schema": "sentiment",
            "metadata": {"custom_id": custom_id}, **fields}  # fmt: skip


def run_batch(client: OpenAI, path: Path, lines: list[dict[str, Any]]) -> Any:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    uploaded = client.files.create(file=path, purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")  # fmt: skip


def post_job(api: Api, token: str, key: str | None = None, **fields: Any) -> tuple[int, Any]:
    envelope = {"feature": "reviews", "prompt": "Classify: 'fine'", "output_schema": "sentiment"}
    headers = {"Idempotency-Key": key} if key else None
    status, body, _ = api.curl("POST", "/v1/jobs", token=token, headers=headers,
                               body=json.dumps({**envelope, **fields}).encode())  # fmt: skip
    return status, body


def team_of(api: Api, job_id: str) -> str | None:
    with api.ledger.session() as s:
        return s.execute(select(Job.team).where(Job.id == job_id)).scalar_one()


def test_a_batch_line_can_neither_squat_nor_probe_another_teams_key(
    api: Api, tmp_path: Path
) -> None:
    alpha, beta = api.token("alpha"), api.token("beta")
    status, used = post_job(api, beta, key="victim-key")
    assert status == 202, used
    # probe: a line naming beta's key as the ledger keeps it, and beta's job id
    probe = run_batch(sdk(api, alpha), tmp_path / "probe.jsonl", [
        line("p1", idempotency_key="team:beta:victim-key"),
        line("p2", id=used["id"]), line("p3", idempotency_key="victim-key"),
    ])  # fmt: skip
    assert probe.request_counts.total == 3  # three jobs of alpha's own, beta's untouched
    # squat: a line takes a key beta has not used yet; beta's own submit is beta's job
    run_batch(sdk(api, alpha), tmp_path / "squat.jsonl",
              [line("s1", idempotency_key="team:beta:future-key")])  # fmt: skip
    status, later = post_job(api, beta, key="future-key")
    assert status == 202, later
    assert team_of(api, later["id"]) == "beta" and team_of(api, used["id"]) == "beta"
    with api.ledger.session() as s:
        owners = s.execute(select(Job.team).where(Job.idempotency_key.like("team:beta:%")))
        assert set(owners.scalars()) == {"beta"}  # no key in beta's space is anyone else's


def test_post_jobs_cannot_take_or_probe_another_teams_job_id(api: Api) -> None:
    alpha, beta = api.token("alpha"), api.token("beta")
    _, theirs = post_job(api, beta, id="order-1182")
    status, mine = post_job(api, alpha, id=theirs["id"])  # the id as beta was shown it
    assert status == 202, mine  # a job of alpha's own, not a 409 that tells beta's exists
    assert mine["id"] != theirs["id"] and team_of(api, mine["id"]) == "alpha"
    code, view, _ = api.curl("GET", mine["url"], token=alpha)
    assert code == 200 and view["id"] == mine["id"]
    again = post_job(api, alpha, id=mine["id"])[1]  # the shown id names the same job again
    assert again["id"] == mine["id"]
    status, long_id = post_job(api, alpha, id="x" * 64)
    assert (status, long_id["error"]["param"]) == (400, "id")


def test_a_team_name_cannot_make_two_teams_keys_meet(api: Api) -> None:
    for bad in ("a:b", "a/b", "Alpha", "-a", "a" * 33, ""):
        made = runner.invoke(cli, ["tokens", "create", "--team", bad])
        assert made.exit_code == 2, (bad, made.output)
        assert f"team {bad!r}" in made.output and "':'" in made.output
    # a token made before the rule, for team `a:b`, is refused with the reason
    old = api.token("a")
    with api.ledger.session() as s:
        s.execute(update(ApiToken).where(ApiToken.team == "a").values(team="a:b"))
    plain = api.token("a")
    status, body = post_job(api, old, key="c")
    assert (status, body["error"]["code"]) == (401, "invalid_team"), body
    assert "'a:b'" in body["error"]["message"] and "tokens create" in body["error"]["message"]
    status, body = post_job(api, plain, key="b:c")  # `a` + `b:c` meets `a:b` + `c` no more
    assert status == 202 and team_of(api, body["id"]) == "a"


def test_a_feature_named_like_another_teams_spends_the_senders_own_budget(
    api: Api, tmp_path: Path, start_workers: Callable[..., Workers]
) -> None:
    alpha, beta = api.token("alpha"), api.token("beta")
    _, own = post_job(api, beta)
    beta_feature = api.curl("GET", own["url"], token=beta)[1]["feature"]
    scope = f"feature:{beta_feature}"
    assert runner.invoke(cli, ["budgets", "set", scope, "100"]).exit_code == 0
    sent = [post_job(api, alpha, feature=f)[1]["id"] for f in ("reviews", beta_feature)]
    run_batch(
        sdk(api, alpha),
        tmp_path / "b.jsonl",
        [line("l1", feature="reviews"), line("l2"), line("l3", feature=beta_feature)],
    )
    start_workers("all")
    wait_until(lambda: all_terminal(api.ledger, 6), timeout_s=90, what="the jobs to finish")

    with api.ledger.session() as s:
        spent = s.execute(select(BudgetSpend.spent_usd).where(BudgetSpend.scope == scope))
        charged = sum(spent.scalars(), Decimal(0))
        by_team = s.execute(select(Job.team, Job.feature, Job.cost_usd)).all()
    beta_cost = sum(c for team, _, c in by_team if team == "beta")
    assert beta_cost > 0
    assert charged - beta_cost == 0, f"alpha's jobs charged ${charged - beta_cost} to {scope}"
    assert {f for team, f, _ in by_team if team == "alpha"} == {
        "alpha/reviews", "alpha/beta/reviews", "alpha/openai-batch"
    }  # fmt: skip
    assert beta_feature == "beta/reviews"  # beta's `reviews`, in beta's own space
    for job_id in sent:
        view = api.curl("GET", f"/v1/jobs/{job_id}", token=alpha)[1]
        assert view["feature"].startswith("alpha/")
    with pytest.raises(openai.BadRequestError):  # a team's feature stays within 100
        run_batch(sdk(api, alpha), tmp_path / "long.jsonl", [line("x", feature="f" * 100)])
