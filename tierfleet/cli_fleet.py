"""`tierfleet fleet show` and `tierfleet fleet check`: the ladder as this machine sees it.

`show` prints each rung (name, backend, model, queue, price per million tokens in and out)
and whether its pool can start here: its backend's URL or key present, or simulated. It
never prints a key, only the name of the variable a missing one belongs in. `check` exits
0 when the fleet file is good and every model has a price, else 2 with one line naming the
file, the tier and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

import typer
from rich.table import Table

from tierfleet.cli_common import Exit, FleetFile, err, fail, load_settings, table_console
from tierfleet.errors import ConfigurationError
from tierfleet.fleet import Tier, pool_needs
from tierfleet.prices import PriceBook
from tierfleet.settings import Settings

fleet_app = typer.Typer(help="The ladder of model tiers: show it, check it.", no_args_is_help=True)


@dataclass(frozen=True, slots=True)
class Rung:
    """One tier as `fleet show` reports it."""

    tier: Tier
    input_usd_per_mtok: Decimal | None  # None: no price in the price file
    output_usd_per_mtok: Decimal | None
    simulated: bool
    missing: str  # the variable (or key) the pool lacks to start here; "" if none

    @property
    def ready(self) -> bool:
        return not self.missing

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.tier.name,
            "backend": self.tier.backend,
            "model": self.tier.model,
            "queue": self.tier.queue,
            "input_usd_per_mtok": _number(self.input_usd_per_mtok),
            "output_usd_per_mtok": _number(self.output_usd_per_mtok),
            "ready": self.ready,
            "missing": self.missing,
            "simulated": self.simulated,
        }


def rungs(settings: Settings, prices: PriceBook) -> list[Rung]:
    out = []
    for tier in settings.fleet:
        price = prices.get(tier.model)
        simulated = settings.simulated(tier)
        needs = None
        if not simulated:
            key = settings.tier_api_key(tier)
            needs = pool_needs(tier, base_url=settings.tier_base_url(tier), has_key=bool(key))
        out.append(
            Rung(
                tier=tier,
                input_usd_per_mtok=price.input_usd_per_mtok if price else None,
                output_usd_per_mtok=price.output_usd_per_mtok if price else None,
                simulated=simulated,
                missing=needs or "",
            )
        )
    return out


def unpriced(settings: Settings, prices: PriceBook) -> str | None:
    """The first tier whose model has no price, as a line naming the file, tier and key."""
    for tier in settings.fleet:
        if tier.model not in prices:
            where = f"fleet file {settings.fleet_file}" if settings.fleet_file else "default fleet"
            return (
                f"{where}: tier {tier.name!r}: model {tier.model!r} has no price in "
                f'{prices.source}; add a [models."{tier.model}"] table (or set '
                "TIERFLEET_PRICES_FILE to a price file that has one)"
            )
    return None


def _prices(settings: Settings) -> PriceBook:
    try:
        return PriceBook.load(settings.prices_file)
    except ConfigurationError as exc:
        raise fail(str(exc), Exit.USAGE) from None


@fleet_app.command("show")
def show(
    fleet: FleetFile = None,
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"tiers": [...]} in ladder order, for scripts.')
    ] = False,
) -> None:
    """Print the ladder, cheapest first: each tier's backend, model, queue, price per
    million tokens, and whether its pool can start here (its URL or key present)."""
    settings = load_settings(fleet)
    found = rungs(settings, _prices(settings))
    if as_json:
        print(json.dumps({"tiers": [r.to_dict() for r in found]}, indent=2))
        return
    source = str(settings.fleet_file) if settings.fleet_file else "the default fleet"
    table = Table(title=f"ladder: {source}")
    for column in ("#", "tier", "backend", "model", "queue"):
        table.add_column(column)
    table.add_column("$/Mtok in", justify="right")
    table.add_column("$/Mtok out", justify="right")
    table.add_column("pool here")
    for i, r in enumerate(found, 1):
        t = r.tier
        table.add_row(
            str(i),
            t.name,
            t.backend,
            t.model,
            t.queue,
            _usd(r.input_usd_per_mtok),
            _usd(r.output_usd_per_mtok),
            _readiness(r),
        )
    table_console().print(table)


@fleet_app.command("check")
def check(fleet: FleetFile = None) -> None:
    """Check the fleet file (TIERFLEET_FLEET_FILE or --fleet) and that every model has a
    price: exit 0 when good, else 2 with one line naming the file, the tier and the key."""
    settings = load_settings(fleet)  # a bad file: one line, exit 2
    problem = unpriced(settings, _prices(settings))
    if problem is not None:
        raise fail(problem, Exit.USAGE)
    source = str(settings.fleet_file) if settings.fleet_file else "the default fleet"
    names = ", ".join(settings.fleet.names)
    err.print(f"{source}: good: {len(settings.fleet)} tiers ({names}), every model priced")


def _readiness(rung: Rung) -> str:
    if rung.simulated:
        return "simulated"
    return "ready" if rung.ready else f"needs {rung.missing}"


def _usd(value: Decimal | None) -> str:
    if value is None:
        return "no price"
    return f"{value:.2f}" if value >= Decimal("0.1") else f"{value:.4f}"


def _number(value: Decimal | None) -> float | None:
    return None if value is None else float(value.quantize(Decimal("1e-6")))
