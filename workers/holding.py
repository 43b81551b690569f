"""Which unacknowledged messages a live worker holds.

kombu's Redis transport records a delivered message in the `unacked` hash and its
delivery time in `unacked_index`, but not who took it: the messages of a worker killed
with SIGKILL stay there until the visibility timeout (an hour) puts them back, and look
held all that time. So each worker process says, every `BEAT_S`, which delivery tags
its channels hold: a key of its own, `tierfleet:consumer:<id>`, that expires after
`ALIVE_TTL_S`, named in the set `tierfleet:consumers`.

A message is held while a live worker lists it, or while it is younger than
`ALIVE_TTL_S` (taken since its worker's last beat). Otherwise its worker is gone. The
cost is one beat (two commands) per worker process every `BEAT_S`, nothing per message.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

from tierfleet import constants as C

log = logging.getLogger("tierfleet.holding")

BEAT_S = 2.0
ALIVE_TTL_S = 10  # a worker silent this long is gone; and a message's grace after delivery


class QoS(kombu_redis.QoS):
    """kombu's, and the process's beat lists the messages it has delivered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        _beat().watch(self)

    def held_tags(self) -> list[str]:
        # copies in one C call each, so the beat thread never sees them change under it;
        # acked tags leave `_delivered` only at the next delivery, `_dirty` has them
        acked = set(self._dirty)
        return [str(tag) for tag in list(self._delivered) if tag not in acked]


class _Beat:
    """One per worker process: a thread that says which tags the process holds."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        name = f"{socket.gethostname()}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.key = C.REDIS_CONSUMER_PREFIX + name
        self._qos: weakref.WeakSet[QoS] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, qos: QoS) -> None:
        with self._lock:
            self._qos.add(qos)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="holding", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:  # Redis away: the next beat tries again
                log.warning("holding beat failed", exc_info=True, extra={"action": "holding.beat"})
            time.sleep(BEAT_S)

    def beat(self) -> None:
        open_ = [q for q in list(self._qos) if not q.channel.closed]
        if not open_:
            return
        tags = sorted({tag for q in open_ for tag in q.held_tags()})
        channel = open_[-1].channel
        with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            pipe.set(self.key, json.dumps(tags), ex=ALIVE_TTL_S)
            pipe.sadd(C.REDIS_CONSUMERS, self.key)
            pipe.execute()


_process_beat: _Beat | None = None


def _beat() -> _Beat:
    global _process_beat
    if _process_beat is None or _process_beat.pid != os.getpid():  # new after a fork
        _process_beat = _Beat()
    return _process_beat


def live_tags(client: redis.Redis) -> set[str]:
    """The delivery tags that live workers say they hold. Forgets the workers gone."""
    keys = [k.decode() for k in client.smembers(C.REDIS_CONSUMERS)]  # type: ignore[union-attr]
    if not keys:
        return set()
    values = client.mget(keys)
    gone = [k for k, v in zip(keys, values, strict=True) if v is None]
    if gone:
        client.srem(C.REDIS_CONSUMERS, *gone)
    return {tag for v in values if v is not None for tag in json.loads(v)}


def orphans(tags: Iterable[str], delivered_at: dict[str, float], live: set[str]) -> set[str]:
    """Of `tags` (messages unacknowledged), those no live worker holds: not listed by one,
    and delivered more than `ALIVE_TTL_S` ago. A message of unknown delivery time is
    taken as held."""
    before = time.time() - ALIVE_TTL_S
    return {t for t in tags if t not in live and delivered_at.get(t, float("inf")) < before}
