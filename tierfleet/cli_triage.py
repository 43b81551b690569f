"""`tierfleet triage`: evaluate the router on labelled prompts, rebuild its memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tierfleet.cli_common import Exit, err, fail, load_settings, open_ledger
from tierfleet.errors import InvalidEnvelope

triage_app = typer.Typer(help="The triage router: evaluate it, rebuild it.", no_args_is_help=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]


def _share(help: str) -> Any:
    """A share of jobs, 0 to 1, given on the command line."""
    return typer.Option(min=0.0, max=1.0, help=help)


@triage_app.command("eval")
def evaluate(
    file: Annotated[
        Path,
        typer.Argument(
            help='JSONL rows {"prompt", "feature", "small_ok", "large_ok"} '
            "(optional small_cost, large_cost in USD)."
        ),
    ],
    online: Annotated[
        bool,
        typer.Option(
            "--online",
            help="Replay the rows in order, learning from each row sent to the small tier, "
            "as production would.",
        ),
    ] = False,
    max_escalation_rate: Annotated[
        float | None,
        _share(
            "Target: at most this share of the jobs sent to the small tier escalate "
            "(default TIERFLEET_TRIAGE_MAX_ESCALATION_RATE)."
        ),
    ] = None,
    frontier_share: Annotated[
        float | None,
        _share(
            "Target instead: this share of the jobs starts on the frontier "
            "(default TIERFLEET_TRIAGE_FRONTIER_SHARE)."
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Score labelled rows with the router and print the quality-versus-frontier-share
    summary: AUROC on needs-the-frontier, CPT(50%), CPT(80%), and last, APGR.

    The target (--max-escalation-rate or --frontier-share; default: the settings') sets
    the thresholds, which matter with --online: they decide which rows reach the small
    tier and so what the router learns."""
    from workers.router.evaluate import evaluate as run
    from workers.router.evaluate import read_rows
    from workers.router.memory import LocalMemory
    from workers.router.router import LearnedRouter, Target, Targets

    if max_escalation_rate is not None and frontier_share is not None:
        raise fail("give --max-escalation-rate or --frontier-share, not both", Exit.USAGE)
    settings = load_settings()
    if max_escalation_rate is None and frontier_share is None:
        max_escalation_rate = settings.triage_max_escalation_rate
        frontier_share = settings.triage_frontier_share
    try:
        rows = read_rows(file)
        router = LearnedRouter(
            memory=LocalMemory(),
            targets=Targets(Target(frontier_share, max_escalation_rate)),
            explore=settings.triage_explore,
        )
        summary = run(rows, router, online=online)
    except InvalidEnvelope as exc:
        raise fail(str(exc), Exit.USAGE) from None
    except ValueError as exc:  # e.g. no gap between the tiers to recover
        raise fail(f"{file}: {exc}", Exit.USAGE) from None
    if as_json:
        print(json.dumps(summary.to_dict()))
        return
    for line in summary.lines():
        print(line)


@triage_app.command("retrain")
def retrain(as_json: JsonFlag = False) -> None:
    """Rebuild the router's per-feature memory from the ledger: every small-tier outcome
    and every triage decision, replacing what Redis holds."""
    from workers.router.memory import RedisMemory
    from workers.router.retrain import rebuild

    settings = load_settings()
    url = settings.real_redis_url()
    if url is None:
        raise fail("retrain needs REDIS_URL: the router's memory lives in Redis", Exit.USAGE)
    memory = RedisMemory.from_url(url)
    with open_ledger(settings) as ledger:
        try:
            report = rebuild(ledger, memory, progress=not as_json)
        finally:
            memory.client.close()
    if as_json:
        print(json.dumps(report))
        return
    err.print(
        f"rebuilt the router's memory: {report['features']} features, "
        f"{report['outcomes']:,} small-tier outcomes, {report['decisions']:,} triage decisions"
    )
