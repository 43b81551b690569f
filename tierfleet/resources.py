"""Where the files that ship beside the code live: schemas, migrations, examples.

In a source checkout (and an editable install) they are the top-level folders of the
repository; a wheel carries them under `tierfleet/_bundled/`.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for candidate in (_PACKAGE / "_bundled" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"tierfleet's {name}/ folder is missing from this installation")


def schemas_dir() -> Path:
    return _find("schemas")


def migrations_dir() -> Path:
    return _find("migrations")


def examples_dir() -> Path:
    return _find("examples")


def default_prices_file() -> Path:
    return _PACKAGE / "data" / "prices.toml"
