"""Hypothesis settings for the fuzz tests, as the profile `chaos`.

The tests take it as the parent of their own settings (`settings(CHAOS, ...)`), so the
rest of the suite keeps Hypothesis's defaults. In CI (CI set) the example database is off,
so every run starts from the seed alone, and a failure prints the blob that replays it.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings

_CI: dict[str, Any] = {"database": None, "print_blob": True} if os.environ.get("CI") else {}

settings.register_profile(
    "chaos",
    deadline=None,  # one example may write a megabyte file or check a fresh JSON Schema
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    **_CI,
)
