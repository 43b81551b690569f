"""Natural mistakes in the environment or the arguments: one line that names the
problem and where it is, exit 2, no traceback, no password."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tierfleet.cli import app
from tierfleet.settings import Settings

pytestmark = pytest.mark.e2e
runner = CliRunner()


def one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "S3cret" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    ("variable", "url", "named"),
    [
        ("REDIS_URL", "http://:S3cret@127.0.0.1:6379/0", "setting REDIS_URL: is a http:// URL"),
        ("DATABASE_URL", "mysql://root:S3cret@127.0.0.1/test", "names a mysql database"),
    ],
    ids=["redis-over-http", "mysql"],
)
def test_a_url_of_the_wrong_kind_is_named_with_its_setting(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, variable: str, url: str, named: str
) -> None:
    monkeypatch.setenv(variable, url)
    assert named in one_line_error(["depth"])


def test_a_redis_database_number_out_of_range_is_named(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/99")
    line = one_line_error(["depth"])
    assert "redis://127.0.0.1:6379/99 has no such database number" in line


def test_a_directory_given_to_submit_is_named(settings: Settings, tmp_path: Path) -> None:
    assert f"{tmp_path}: a directory, not a JSON lines file" in one_line_error(
        ["submit", str(tmp_path)]
    )


def test_every_option_of_every_command_says_what_it_does() -> None:
    import click
    import typer.main

    def commands(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from commands(sub, f"{path} {name}")
        else:
            yield path, cmd

    silent = [
        f"{path} {'/'.join(p.opts)}"
        for path, cmd in commands(typer.main.get_command(app), "tierfleet")
        for p in cmd.params
        if isinstance(p, click.Option) and p.name != "help" and not p.help
    ]
    assert silent == []


def test_a_piped_table_keeps_its_columns_whole(settings: Settings) -> None:
    feature = "feature:" + "a-long-feature-name-" * 5
    set_cap = runner.invoke(app, ["budgets", "set", feature, "12.50"])
    assert set_cap.exit_code == 0, set_cap.output
    shown = runner.invoke(app, ["budgets"])  # not a terminal: as wide as the table
    assert shown.exit_code == 0, shown.output
    assert feature in shown.output and "…" not in shown.output
