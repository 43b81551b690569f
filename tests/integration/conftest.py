"""The worker runtime the step-level tests share: the settings of the test services,
a Celery app on the test Redis, the test ledger, simulated backends (a test scripts its
own with `tests.integration.test_steps.script`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tierfleet.db import Ledger
from tierfleet.settings import Settings
from tierfleet.transport import make_celery
from workers.runtime import Runtime


@pytest.fixture
def rt(settings: Settings, ledger: Ledger) -> Iterator[Runtime]:
    celery = make_celery(settings)
    runtime = Runtime.build(settings, celery, ledger)
    yield runtime
    runtime.close()  # backends, the router's memory, metrics (the ledger is the test's)
    celery.close()
