"""Protocol-faithful fake model providers on loopback, for the real SDK clients.

    with FakeVLLM() as vllm:
        vllm.when("cancel my order", Error(429, retry_after_s=2), Answer())
        client = openai.OpenAI(base_url=vllm.base_url, api_key="EMPTY", max_retries=0)

`FakeVLLM` serves vLLM's OpenAI-compatible API (and `/metrics`); `FakeAnthropic` serves the
Messages API. Both play scripted actions (`Answer`, `Invalid`, `Truncated`, `Error`, `Hang`,
`Drop`, `Malformed`) chosen by markers in the prompt, and record every request.
"""

from tests.fakes.actions import (
    Action,
    Answer,
    Drop,
    Error,
    Hang,
    Invalid,
    Malformed,
    NotRun,
    Truncated,
    count_tokens,
    split_tokens,
)
from tests.fakes.anthropic_server import FakeAnthropic, prompt_blocks
from tests.fakes.openai_server import DEFAULT_MODEL, FakeOpenAI, FakeVLLM
from tests.fakes.server import FakeServer, RecordedRequest

__all__ = [
    "DEFAULT_MODEL",
    "Action",
    "Answer",
    "Drop",
    "Error",
    "FakeAnthropic",
    "FakeOpenAI",
    "FakeServer",
    "FakeVLLM",
    "Hang",
    "Invalid",
    "Malformed",
    "NotRun",
    "RecordedRequest",
    "Truncated",
    "count_tokens",
    "prompt_blocks",
    "split_tokens",
]
