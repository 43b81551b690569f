"""What the broker holds, read straight from Redis: the messages ready on each queue
(kombu keeps a queue as a list, and each priority step as a list of its own), and those
delivered to a worker but not yet acknowledged (kombu's `unacked` hash), by queue and by
the job or batch they carry. A message whose worker is gone (`workers/holding.py`) stays
unacknowledged until the visibility timeout, but holds no job or batch."""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from tierfleet import constants as C
from workers import holding

PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: `queue`, `queue\x06\x163`, ...
PRIORITY_STEPS = (3, 6, 9)


@dataclass
class Held:
    """Ready messages per queue; unacknowledged ones per queue, and the jobs and batches
    those carry, while their worker lives; and per queue those whose worker is gone
    (`orphaned`: kombu restores them at the visibility timeout, and their jobs are
    re-driven sooner, so they are not work a pool has to scale for)."""

    ready: dict[str, int] = field(default_factory=dict)
    unacked: Counter[str] = field(default_factory=Counter)
    orphaned: Counter[str] = field(default_factory=Counter)
    job_ids: set[str] = field(default_factory=set)
    batch_ids: set[str] = field(default_factory=set)


def held(client: redis.Redis, queues: list[str]) -> Held:
    out = Held()
    live = holding.live_tags(client)  # first: a message taken after it is young
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.llen(queue)
            for step in PRIORITY_STEPS:
                pipe.llen(f"{queue}{PRIORITY_SEP}{step}")
        pipe.hgetall(C.REDIS_UNACKED)
        pipe.zrange(C.REDIS_UNACKED_INDEX, 0, -1, withscores=True)
        *lengths, unacked, index = pipe.execute()
    per = 1 + len(PRIORITY_STEPS)
    for i, queue in enumerate(queues):
        out.ready[queue] = sum(lengths[i * per : (i + 1) * per])
    delivered_at = {tag.decode(): score for tag, score in index}
    tags = {tag.decode(): raw for tag, raw in unacked.items()}
    orphans = holding.orphans(tags, delivered_at, live)
    for tag, raw in tags.items():
        in_queue, task, args = _unacked(raw)
        if in_queue is not None:
            (out.orphaned if tag in orphans else out.unacked)[in_queue] += 1
        if tag in orphans:
            continue
        if task == C.TASK_TRIAGE_RANGE and args:
            out.batch_ids.add(str(args[0]))
        elif task in (C.TASK_TRIAGE, C.TASK_ATTEMPT) and args:
            out.job_ids.add(str(args[0]))
    return out


def _unacked(raw: bytes | str) -> tuple[str | None, str | None, list[Any]]:
    """The queue, task name and args of a kombu message as the unacked hash stores it:
    `[message, exchange, routing_key]`."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None, None, []
    queue = entry[2] if isinstance(entry, list) and len(entry) > 2 else None
    try:
        message = entry[0]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return queue, message.get("headers", {}).get("task"), list(args)
    except (ValueError, KeyError, IndexError, TypeError):
        return queue, None, []
