"""Loaded by every worker process `bench/fleet_overhead.py` starts (on PYTHONPATH):
counts the SQL statements the process sends, by their first words, into
`$BENCH_SQL_COUNTS/<pid>.json`, flushed twice a second (forked children too)."""

from __future__ import annotations

import collections
import json
import os
import re
import threading
import time

_DIR = os.environ.get("BENCH_SQL_COUNTS")
_counts: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()


def _kind(statement: str) -> str:
    words = statement.strip().split(None, 3)
    head = " ".join(words[:2]).upper() if words else "?"
    if head.startswith(("SELECT", "UPDATE", "INSERT", "DELETE")):
        table = re.search(r"\b(?:FROM|UPDATE|INTO)\s+(\w+)", statement, re.I)
        return f"{words[0].upper()} {table.group(1) if table else '?'}"
    return words[0].upper() if words else "?"


def _flush_forever() -> None:
    while True:
        time.sleep(0.5)
        with _lock:
            data = dict(_counts)
        path = os.path.join(_DIR or ".", f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(data, f)
        os.replace(path + ".tmp", path)


def _start() -> None:
    _counts.clear()
    threading.Thread(target=_flush_forever, daemon=True).start()


if _DIR:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "before_cursor_execute")
    def _count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        with _lock:
            _counts[_kind(statement)] += (
                len(parameters) if executemany and isinstance(parameters, list) else 1
            )

    @event.listens_for(Engine, "commit")
    def _commit(conn):  # type: ignore[no-untyped-def]
        with _lock:
            _counts["COMMIT"] += 1

    @event.listens_for(Engine, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        with _lock:
            _counts["BEGIN"] += 1

    _start()
    os.register_at_fork(after_in_child=_start)
