from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from tierfleet.errors import ConfigurationError
from tierfleet.prices import PriceBook, Usage

book = PriceBook.load()


def test_frontier_cost_is_list_price_times_tokens() -> None:
    sonnet = book["claude-sonnet-4-6"]
    # 1,234 input at $3/M and 567 output at $15/M
    assert sonnet.cost_usd(Usage(1234, 567)) == Decimal("0.003702") + Decimal("0.008505")


def test_cache_tokens_use_the_multipliers_and_batch_halves() -> None:
    sonnet = book["claude-sonnet-4-6"]
    usage = Usage(
        input_tokens=100, output_tokens=10, cache_write_tokens=1000, cache_read_tokens=10_000
    )
    expected = 100 * 3 + 10 * 15 + 1000 * 3 * Decimal("1.25") + 10_000 * 3 * Decimal("0.1")
    assert sonnet.cost_usd(usage) == (expected / 1_000_000).quantize(Decimal("1e-8"))
    assert sonnet.cost_usd(usage, batch=True) == (expected / 2_000_000).quantize(Decimal("1e-8"))


def test_the_small_tier_is_priced_from_gpu_hours_and_never_free() -> None:
    llama = book["meta-llama/Meta-Llama-3-8B-Instruct"]
    # $1.006/h / (1,000 tok/s * 3600 s * 0.6 utilisation) per output token
    per_mtok = Decimal("1.006") / (1000 * 3600 * Decimal("0.6")) * 1_000_000
    assert llama.output_usd_per_mtok == per_mtok
    assert llama.cost_usd(Usage(0, 1)) > 0
    assert llama.cost_usd(Usage(1000, 200)) < book["claude-haiku-4-5"].cost_usd(Usage(1000, 200))


def test_an_unknown_model_names_the_file() -> None:
    with pytest.raises(ConfigurationError, match=r"has no price in .*prices\.toml"):
        book["gpt-imaginary"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('[models."m"]\nprovider = "x"\ninput_usd_per_mtok = 1\n', "lacks 'output_usd_per_mtok'"),
        ('[models."m"]\ninput_usd_per_mtok = "1"\noutput_usd_per_mtok = 1\n', "must be a number"),
        (
            '[models."m"]\ninput_usd_per_mtok = -1\noutput_usd_per_mtok = 1\n',
            "must not be negative",
        ),
        ("[models.m\n", "cannot read price file"),
    ],
)
def test_a_bad_price_file_is_a_clear_error(tmp_path: Path, body: str, words: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        "[defaults]\ncache_write_multiplier = 1.25\ncache_read_multiplier = 0.1\n"
        "batch_discount = 0.5\n" + body
    )
    with pytest.raises(ConfigurationError, match=words):
        PriceBook.load(path)
