"""`tierfleet triage`: evaluate the router on labelled prompts, rebuild its memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tierfleet.cli_common import Exit, FleetFile, err, fail, load_settings, open_ledger
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
            help='Labelled rows, JSONL or a JSON array: {"prompt", "feature", "ok": {rung: '
            'bool}, "cost_usd": {rung: USD}} for a ladder; or {"prompt", "feature", '
            '"small_ok", "large_ok"} (optional small_cost, large_cost) for two tiers.'
        ),
    ],
    ladder: Annotated[
        str | None,
        typer.Option(
            "--ladder",
            metavar="A,B,C",
            help="The rungs, cheapest first, as the rows' ok and cost_usd name them "
            "(default: the fleet's tier names).",
        ),
    ] = None,
    fleet: FleetFile = None,
    online: Annotated[
        bool,
        typer.Option(
            "--online",
            help="Replay the rows in order, learning only from what the fleet would observe "
            "(each answer below the top rung), as production would.",
        ),
    ] = False,
    max_escalation_rate: Annotated[
        float | None,
        _share(
            "Target: at most this share of the jobs sent to a rung below the top escalate "
            "(default TIERFLEET_TRIAGE_MAX_ESCALATION_RATE)."
        ),
    ] = None,
    frontier_share: Annotated[
        float | None,
        _share(
            "Target instead: at most this share of the jobs that reach a rung start above "
            "it (default TIERFLEET_TRIAGE_FRONTIER_SHARE)."
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Replay labelled rows through the router.

    Ladder rows: the cascade as production runs it (start where triage says, climb while
    the answer is not ok, pay each rung tried); prints the share started on each rung,
    quality and cost, beside all-top and always-start-at-the-bottom, and last
    `savings_pct: X` against all-top. Two-tier rows: AUROC on needs-the-frontier, CPT(50%),
    CPT(80%), and last, APGR.

    The target (--max-escalation-rate or --frontier-share; default: the settings') sets
    the thresholds, which matter with --online: they decide which rows reach which rung
    and so what the router learns."""
    from workers.router.cascade import is_ladder_row, ladder_rows, read_records, replay
    from workers.router.evaluate import evaluate as run
    from workers.router.evaluate import read_rows
    from workers.router.memory import LocalMemory
    from workers.router.router import LearnedRouter, Target, Targets

    if max_escalation_rate is not None and frontier_share is not None:
        raise fail("give --max-escalation-rate or --frontier-share, not both", Exit.USAGE)
    settings = load_settings(fleet)
    if max_escalation_rate is None and frontier_share is None:
        max_escalation_rate = settings.triage_max_escalation_rate
        frontier_share = settings.triage_frontier_share
    rungs = _ladder(ladder) if ladder is not None else list(settings.fleet.names)
    summary: Any
    try:
        records = read_records(file)
        router = LearnedRouter(
            memory=LocalMemory(),
            targets=Targets(Target(frontier_share, max_escalation_rate)),
            explore=settings.triage_explore,
        )
        if is_ladder_row(records[0][1]):
            summary = replay(ladder_rows(records, rungs), rungs, router, online=online)
        elif ladder is not None:
            raise fail(
                f'{records[0][0]}: --ladder needs ladder rows, with "ok" and "cost_usd" '
                "objects by rung",
                Exit.USAGE,
            )
        else:
            summary = run(read_rows(file), router, online=online)
    except InvalidEnvelope as exc:
        raise fail(str(exc), Exit.USAGE) from None
    except ValueError as exc:  # e.g. no gap between the tiers to recover
        raise fail(f"{file}: {exc}", Exit.USAGE) from None
    if as_json:
        print(json.dumps(summary.to_dict()))
        return
    for line in summary.lines():
        print(line)


def _ladder(text: str) -> list[str]:
    rungs = [r.strip() for r in text.split(",")]
    if len(rungs) < 2 or not all(rungs) or len(set(rungs)) != len(rungs):
        raise fail(
            f"--ladder {text!r}: give two or more distinct rung names, cheapest first, "
            "separated by commas",
            Exit.USAGE,
        )
    return rungs


@triage_app.command("retrain")
def retrain(as_json: JsonFlag = False) -> None:
    """Rebuild the router's per-(feature, tier) memory from the ledger: every outcome on a
    rung below the top and every triage decision, replacing what Redis holds."""
    from workers.router.memory import RedisMemory
    from workers.router.retrain import rebuild

    settings = load_settings()
    url = settings.real_redis_url()
    if url is None:
        raise fail("retrain needs REDIS_URL: the router's memory lives in Redis", Exit.USAGE)
    memory = RedisMemory.from_url(url)
    with open_ledger(settings) as ledger:
        try:
            report = rebuild(ledger, memory, ladder=settings.fleet.names, progress=not as_json)
        finally:
            memory.client.close()
    if as_json:
        print(json.dumps(report))
        return
    err.print(
        f"rebuilt the router's memory: {report['features']} features, "
        f"{report['outcomes']:,} outcomes below the top rung, {report['decisions']:,} triage "
        "decisions"
    )
