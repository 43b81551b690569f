"""The HTTP API under test: uvicorn in a thread on a free port, and curl to call it."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn

from producers.api import tokens
from producers.api.app import create_app
from tests.conftest import wait_until
from tierfleet.db import Ledger
from tierfleet.settings import Settings


@dataclass
class Api:
    url: str
    ledger: Ledger

    def token(self, team: str = "growth", **kw: Any) -> str:
        return tokens.create(self.ledger, team, **kw)[1]

    def curl(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        """The request by curl: status, parsed JSON body, response headers."""
        args = ["curl", "-sS", "-X", method, "-D", "-", f"{self.url}{path}"]
        for name, value in {**({"Authorization": f"Bearer {token}"} if token else {}),
                            **(headers or {})}.items():  # fmt: skip
            args += ["-H", f"{name}: {value}"]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
        out = subprocess.run(args, input=body, capture_output=True, check=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        while head.startswith(b"HTTP/1.1 100"):  # curl's Expect: 100-continue
            head, _, payload = payload.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        got = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        return status, json.loads(payload) if payload else None, got


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def serve_api(settings: Settings, ledger: Ledger) -> Iterator[Callable[..., Api]]:
    """Start an API server, with settings overridden as given."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides: Any) -> Api:
        port = _free_port()
        app = create_app(Settings.from_env(**overrides) if overrides else settings)
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_until(lambda: server.started, timeout_s=20, what="the API server")
        return Api(f"http://127.0.0.1:{port}", ledger)

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def api(serve_api: Callable[..., Api]) -> Api:
    return serve_api()
