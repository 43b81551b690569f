"""kombu's Redis transport, with one Redis client per channel for its commands.

kombu builds a new `redis.Redis` for every publish, acknowledgement and queue read outside
the consumer's own connection (`Channel.conn_or_acquire`); each one copies redis-py's
table of some two hundred response callbacks, which cost a tenth of a triage worker's CPU
time. A `redis.Redis` is safe to share between threads (each command takes a connection
from the pool), so a channel keeps one, built again only when kombu replaces its pool
(after a lost connection). Everything else is kombu's.

`install()` makes it the transport of redis:// and rediss:// URLs in this process: a
worker's (the URL, and so every log line that names the broker, stays as it was).
Producers in other programs keep kombu's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kombu.transport as kombu_transport
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from workers import holding


class Channel(kombu_redis.Channel):
    QoS = holding.QoS  # and the worker says which messages it holds (`workers/holding.py`)
    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()  # type: ignore[no-untyped-call]
        yield shared


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    resolved = getattr(kombu_transport, "_transport_cache", {})  # kombu's, by alias
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        resolved.pop(scheme, None)  # resolved before this process installed it
