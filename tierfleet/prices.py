"""Prices from the data file, and the cost of one attempt from its usage.

Money is `Decimal` from the file to the ledger; floats only reach DogStatsD.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from tierfleet.errors import ConfigurationError
from tierfleet.resources import default_prices_file

MILLION = Decimal(1_000_000)
USD_QUANTUM = Decimal("0.00000001")  # the ledger's Numeric(18, 8)


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ModelPrice:
    model: str
    provider: str
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    cache_write_multiplier: Decimal
    cache_read_multiplier: Decimal
    batch_discount: Decimal

    def cost_usd(self, usage: Usage, *, batch: bool = False) -> Decimal:
        base_in = self.input_usd_per_mtok
        total = (
            usage.input_tokens * base_in
            + usage.output_tokens * self.output_usd_per_mtok
            + usage.cache_write_tokens * base_in * self.cache_write_multiplier
            + usage.cache_read_tokens * base_in * self.cache_read_multiplier
        ) / MILLION
        if batch:
            total *= self.batch_discount
        return total.quantize(USD_QUANTUM)


class PriceBook:
    """All model prices; `PriceBook.load()` reads the TOML data file."""

    def __init__(self, prices: dict[str, ModelPrice], source: Path) -> None:
        self._prices = prices
        self.source = source

    @classmethod
    def load(cls, path: Path | None = None) -> PriceBook:
        path = path or default_prices_file()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"cannot read price file {path}: {exc}") from exc
        defaults = data.get("defaults", {})
        prices = {}
        for model, entry in data.get("models", {}).items():
            prices[model] = _parse_model(model, {**defaults, **entry}, path)
        return cls(prices, path)

    def __getitem__(self, model: str) -> ModelPrice:
        try:
            return self._prices[model]
        except KeyError:
            raise ConfigurationError(
                f"model {model!r} has no price in {self.source}; add a [models.{model!r}] table"
            ) from None

    def get(self, model: str) -> ModelPrice | None:
        return self._prices.get(model)

    def __contains__(self, model: object) -> bool:
        return model in self._prices

    def models(self) -> list[str]:
        return sorted(self._prices)


def _dec(entry: dict[str, Any], key: str, model: str, path: Path) -> Decimal:
    if key not in entry:
        raise ConfigurationError(f"{path}: model {model!r} lacks {key!r}")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{path}: model {model!r}: {key!r} must be a number")
    if value < 0:
        raise ConfigurationError(f"{path}: model {model!r}: {key!r} must not be negative")
    return Decimal(str(value))


def _parse_model(model: str, entry: dict[str, Any], path: Path) -> ModelPrice:
    if "gpu_usd_per_hour" in entry:
        gpu_hour = _dec(entry, "gpu_usd_per_hour", model, path)
        utilization = _dec(entry, "utilization", model, path) if "utilization" in entry else 1
        per_tok_s = {}
        for kind in ("input", "output"):
            rate = _dec(entry, f"{kind}_tokens_per_s", model, path)
            if rate == 0 or utilization == 0:
                raise ConfigurationError(f"{path}: model {model!r}: throughput must be above 0")
            per_tok_s[kind] = gpu_hour / (rate * 3600 * Decimal(utilization)) * MILLION
        input_price, output_price = per_tok_s["input"], per_tok_s["output"]
    else:
        input_price = _dec(entry, "input_usd_per_mtok", model, path)
        output_price = _dec(entry, "output_usd_per_mtok", model, path)
    return ModelPrice(
        model=model,
        provider=str(entry.get("provider", "unknown")),
        input_usd_per_mtok=input_price,
        output_usd_per_mtok=output_price,
        cache_write_multiplier=_dec(entry, "cache_write_multiplier", model, path),
        cache_read_multiplier=_dec(entry, "cache_read_multiplier", model, path),
        batch_discount=_dec(entry, "batch_discount", model, path),
    )
