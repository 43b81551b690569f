"""A real vLLM server for the tests in this directory (`make test-vllm`): vLLM's CPU build
from its own virtualenv (TIERFLEET_TEST_VLLM_PYTHON names its Python) serving a tiny
Llama-architecture model with random weights (`--load-format dummy`) through its
OpenAI-compatible server, one per test session, on a free loopback port.

Without TIERFLEET_TEST_VLLM_PYTHON (a plain `make test`) these tests are skipped.
TIERFLEET_TEST_VLLM_URL uses a server already running instead (it must serve the model
under the small tier's default name, as `vllm_server` does).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tierfleet.settings import Settings

HERE = Path(__file__).resolve().parent
STARTUP_DEADLINE_S = 420.0  # three processes import torch and vLLM on 2 cores
# The model is served under the small tier's default name: the default fleet and its price
# apply as they do in production.
SERVED_MODEL = str(Settings.model_fields["slm_model"].default)
MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 2  # a small batch, so that a burst of requests leaves some waiting
# A CPU answers in seconds what a GPU answers in milliseconds: the small tier's call timeout
# (2 s + 20 ms a token by default) is lifted, so that a slow answer is not a timeout.
SLM_TIMEOUT_BASE_S = 60.0

# What the tests saw, printed at the end of the run.
FIGURES: dict[str, Any] = {}


@dataclass(frozen=True)
class VLLMServer:
    base_url: str  # ends in /v1, as VLLM_BASE_URL does
    model: str
    log: Path | None

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    @property
    def vocab_size(self) -> int:
        """From the served model's config (vLLM's model list names its directory)."""
        models = httpx2.get(f"{self.base_url}/models", timeout=10).json()["data"]
        config = Path(models[0]["root"]) / "config.json"
        return int(json.loads(config.read_text())["vocab_size"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(log: Path, n: int = 60) -> str:
    lines = log.read_text(errors="replace").splitlines()
    return "\n".join(line for line in lines[-n:] if "Route:" not in line)


def _wait_healthy(proc: subprocess.Popen[bytes], root: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"vLLM exited with {proc.returncode} while starting; log {log}:\n{_tail(log)}",
                pytrace=False,
            )
        try:
            if httpx2.get(f"{root}/health", timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(
        f"vLLM not healthy after {STARTUP_DEADLINE_S:.0f}s; log {log}:\n{_tail(log)}",
        pytrace=False,
    )


def _warm_up(base_url: str) -> None:
    """One schema-constrained request: the first one builds the grammar compiler's view of
    the vocabulary (seconds), and a model the CPU kernels cannot run fails here, clearly."""
    response = httpx2.post(
        f"{base_url}/chat/completions",
        json={
            "model": SERVED_MODEL,
            "messages": [{"role": "user", "content": "warm up"}],
            "max_tokens": 32,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "w", "schema": {"type": "object"}},
            },
        },
        timeout=120,
    )
    response.raise_for_status()


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERFLEET_", "VLLM_"))}
    env.update(
        HF_HUB_OFFLINE="1",  # the model directory is local; nothing is fetched
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB: a million tokens of this model's KV cache
        VLLM_CPU_OMP_THREADS_BIND="auto",  # the model's worker on one core, HTTP on the other
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    existing = os.environ.get("TIERFLEET_TEST_VLLM_URL")
    if existing:
        yield VLLMServer(existing.rstrip("/"), SERVED_MODEL, None)
        return
    python = os.environ.get("TIERFLEET_TEST_VLLM_PYTHON")
    if not python:
        pytest.skip("needs vLLM's CPU build: run `make test-vllm`")
    work = tmp_path_factory.mktemp("vllm")
    model_dir, log = work / "tiny-llama", work / "server.log"
    env = _server_env()
    subprocess.run([python, str(HERE / "tiny_model.py"), str(model_dir)], env=env, check=True)
    port = _free_port()
    command = [
        python,
        # not `vllm serve`: that command looks up the version of a distribution named
        # `vllm`, and the CPU build's is `vllm-cpu`
        "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", SERVED_MODEL,
        "--load-format", "dummy",  # random weights: the config is all the model there is
        "--dtype", "float32",  # no bfloat16 without AVX-512 on this CPU backend
        "--max-model-len", str(MAX_MODEL_LEN),
        "--max-num-seqs", str(MAX_NUM_SEQS),
        "--enforce-eager",  # no torch.compile: starts about 40 s sooner
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    started = time.monotonic()
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        root = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, root, log)
        FIGURES["server_start_s"] = round(time.monotonic() - started, 1)
        warm = time.monotonic()
        _warm_up(f"{root}/v1")
        FIGURES["first_request_s"] = round(time.monotonic() - warm, 1)
        FIGURES["server_log"] = str(log)
        yield VLLMServer(f"{root}/v1", SERVED_MODEL, log)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # its engine and worker processes too
            proc.wait()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("vLLM figures")
    for key, value in FIGURES.items():
        terminalreporter.write_line(f"{key}: {value}")
    log = Path(FIGURES["server_log"]) if "server_log" in FIGURES else None
    failed = terminalreporter.stats.get("failed") or terminalreporter.stats.get("error")
    if failed and log is not None and log.exists():
        terminalreporter.section("vLLM server log (last lines)")
        terminalreporter.write_line(_tail(log, 80))
