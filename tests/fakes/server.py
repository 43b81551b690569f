"""What the fake providers share: a Starlette app served by uvicorn on loopback in a daemon
thread, request recording, and the per-request script (`when`, `default_action`).

The app runs on the uvicorn thread's event loop while tests change the script from the
main thread, so script state sits behind a `threading.Lock`. Everything that waits uses
`asyncio.sleep`, so hundreds of requests can be in flight at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

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
)

__all__ = ["FakeServer", "RecordedRequest"]

_SEND_KEY = "tierfleet.fakes.send"  # the server's own ASGI `send`, kept in the scope for Drop


@dataclass(frozen=True)
class RecordedRequest:
    """One request to a fake's API endpoint. Indexing reads the body:
    `fake.requests[0]["max_tokens"]` is `fake.requests[0].body["max_tokens"]`."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # the parsed JSON (or the raw text when it did not parse)
    action: Action | None = field(default=None)  # what the script played (None: rejected)

    def __getitem__(self, key: str) -> Any:
        return self.body[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.body.get(key, default) if isinstance(self.body, Mapping) else default


class FakeServer:
    """Base of `FakeVLLM` and `FakeAnthropic`. Use as a context manager or `start()`/`stop()`.

    Attributes tests may set: `latency_s` (delay before every answer), `default_action`
    (what requests matching no marker get). `requests` lists every API request received.
    """

    name = "fake"

    def __init__(self, *, latency_s: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._scripts: list[tuple[str, deque[Action]]] = []
        self.requests: list[RecordedRequest] = []
        self.latency_s = latency_s
        self.default_action: Action = Answer()
        self._in_flight = 0
        self.peak_in_flight = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None  # set by stop(): pending sleeps end
        self._port: int | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        raise NotImplementedError

    def start(self, *, timeout_s: float = 10.0) -> Self:
        if self._thread is not None:
            return self
        app = Starlette(routes=self.routes())
        config = uvicorn.Config(
            _keep_send(app),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
            http="h11",
            ws="none",
            access_log=False,
            # longer than the clients' keep-alive (httpx: 5 s), so a client never reuses a
            # connection the server is closing at that moment
            timeout_keep_alive=30,
            backlog=4096,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=asyncio.run,
            args=(self._serve(server),),
            name=f"{self.name}-uvicorn",
            daemon=True,
        )
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"{self.name}: uvicorn exited during start-up")
            if time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"{self.name}: uvicorn did not start in {timeout_s}s")
            time.sleep(0.005)
        self._server, self._thread = server, thread
        self._port = server.servers[0].sockets[0].getsockname()[1]
        return self

    async def _serve(self, server: uvicorn.Server) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        await server.serve()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop the server. Requests still sleeping (`Hang`, latency) drop their connections."""
        server, thread, loop, stopping = self._server, self._thread, self._loop, self._stopping
        if server is None or thread is None:
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already gone
                loop.call_soon_threadsafe(stopping.set)
        server.should_exit = True
        thread.join(timeout_s)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout_s)
        self._server = self._thread = self._port = self._loop = self._stopping = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name} is not running; call start()")
        return self._port

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- scripting ---------------------------------------------------------------------

    def when(self, marker: str, *actions: Action) -> Self:
        """Requests whose prompt text contains `marker` play `actions` in order, one each;
        then they get `Answer()`. The first registered marker found in a prompt wins;
        calling `when` again with the same marker appends to its actions."""
        with self._lock:
            for known, queue in self._scripts:
                if known == marker:
                    queue.extend(actions)
                    break
            else:
                self._scripts.append((marker, deque(actions)))
        return self

    def reset(self) -> None:
        """Forget scripts, recorded requests, latency and the default action."""
        with self._lock:
            self._scripts.clear()
            self.requests.clear()
            self.latency_s = 0.0
            self.default_action = Answer()
            self.peak_in_flight = self._in_flight
            self._reset_state()

    def _reset_state(self) -> None:
        """Subclass state to clear in `reset()` (called with the lock held)."""

    @property
    def in_flight(self) -> int:
        """API requests being handled right now (including ones sleeping or hanging)."""
        return self._in_flight

    @property
    def bodies(self) -> list[Any]:
        """The bodies of `requests`."""
        with self._lock:
            return [r.body for r in self.requests]

    # --- what subclasses provide ---------------------------------------------------------

    def prompt_text(self, body: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def validate(self, request: Request, body: Any) -> Response | None:
        """An error response for a request the real server would reject, else None."""
        raise NotImplementedError

    def error_response(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> Response:
        raise NotImplementedError

    def answer(self, body: Mapping[str, Any], action: Answer | Invalid | Truncated) -> Response:
        raise NotImplementedError

    # --- the request cycle ---------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """Record, validate, pick the scripted action and play it."""
        raw = await request.body()
        try:
            body: Any = json.loads(raw)
            parsed = True
        except ValueError:
            body, parsed = raw.decode("utf-8", "replace"), False
        headers = dict(request.headers)
        rejection = (
            self.error_response(400, "The request body is not valid JSON.")
            if not parsed
            else self.validate(request, body)
        )
        with self._lock:
            action = None if rejection is not None else self._next_action(self.prompt_text(body))
            self.requests.append(
                RecordedRequest(request.method, request.url.path, headers, body, action)
            )
        if rejection is not None or action is None:
            return rejection if rejection is not None else _gone()
        with self._counting():
            return await self._play(request, body, action)

    def _next_action(self, text: str) -> Action:
        for marker, queue in self._scripts:
            if marker in text:
                return queue.popleft() if queue else Answer()
        return self.default_action

    @contextlib.contextmanager
    def _counting(self) -> Iterator[None]:
        self._in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            yield
        finally:
            self._in_flight -= 1

    async def _play(self, request: Request, body: Any, action: Action) -> Response:
        if isinstance(action, NotRun):
            action = Answer()  # a message-batch outcome: a request of its own just runs
        if isinstance(action, Drop):
            return await drop_connection(request)
        if isinstance(action, Error):
            return self.error_response(
                action.status,
                action.message,
                type=action.type,
                retry_after_s=action.retry_after_s,
            )
        if isinstance(action, Hang):
            if not await self._pause(request, action.seconds):
                return await drop_connection(request)
            action = Answer()
        delay = self.latency_s
        if isinstance(action, Answer) and action.delay_s is not None:
            delay = action.delay_s
        if delay > 0 and not await self._pause(request, delay):
            return await drop_connection(request)
        if isinstance(action, Malformed):
            return self.malformed(body, action)
        return self.answer(body, action)

    def malformed(self, body: Mapping[str, Any], action: Malformed) -> Response:
        """A 200 that is no usable answer (see `Malformed`), made from a normal answer."""
        if action.text is not None:
            content = action.text
        else:
            whole = bytes(self.answer(body, Answer()).body).decode()
            if action.drop:
                value = json.loads(whole)
                for path in action.drop:
                    _remove(value, path)
                content = json.dumps(value)
            else:
                content = whole[: len(whole) // 2]
        return Response(content, status_code=200, media_type=action.content_type)

    async def _pause(self, request: Request, seconds: float) -> bool:
        """Sleep `seconds`. False if the client left meanwhile or the server is stopping."""
        stopping = self._stopping
        return await sleep_while_connected(
            request, seconds, until=stopping.wait() if stopping is not None else None
        )


def _remove(value: Any, path: str) -> None:
    """Delete the field at a dotted `path` ("usage.input_tokens", "choices.0.message")."""
    *parents, last = path.split(".")
    for part in parents:
        value = value[int(part)] if isinstance(value, list) else value[part]
    if isinstance(value, list):
        del value[int(last)]
    elif last in value:
        del value[last]
    else:
        raise KeyError(f"Malformed(drop=...): the answer has no field {path!r}")


def _gone() -> Response:
    """A response nobody will read: the client has left."""
    return Response(status_code=499)


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + uuid.uuid4().hex[:length]


def retry_after_header(retry_after_s: float | None) -> dict[str, str]:
    if retry_after_s is None:
        return {}
    value = float(retry_after_s)
    return {"retry-after": str(int(value)) if value.is_integer() else repr(value)}


def _keep_send(app: Starlette) -> Callable[..., Awaitable[None]]:
    """Wrap the app so handlers can reach the server's own `send` (see `drop_connection`)."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope[_SEND_KEY] = send
        await app(scope, receive, send)

    return asgi


async def sleep_while_connected(
    request: Request, seconds: float, *, until: Coroutine[Any, Any, Any] | None = None
) -> bool:
    """Sleep `seconds`; return False early if the client disconnects meanwhile (or when the
    optional `until` coroutine finishes first).

    Waiting on `receive()` after the body has been read is what makes uvicorn read from the
    socket again, so it notices the client's close.
    """

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    sleeper = asyncio.ensure_future(asyncio.sleep(seconds))
    tasks = [sleeper, asyncio.ensure_future(disconnected())]
    if until is not None:
        tasks.append(asyncio.ensure_future(until))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return done == {sleeper}


async def drop_connection(request: Request) -> Response:
    """Close the TCP connection without writing a response.

    Closes uvicorn's transport for this request, then waits for uvicorn to see the
    connection as lost, so the response returned here is discarded and uvicorn logs
    nothing. The client gets "server disconnected without sending a response".
    """
    send = request.scope.get(_SEND_KEY)
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        raise RuntimeError("cannot reach the connection to drop it (not uvicorn's h11 server?)")
    transport.close()
    deadline = time.monotonic() + 1.0
    while not getattr(cycle, "disconnected", True) and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    return _gone()
