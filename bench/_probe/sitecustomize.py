"""Loaded by every worker process `bench/fleet_overhead.py` starts (on PYTHONPATH):
counts what the process sends to Postgres, by its first words, into
`$BENCH_SQL_COUNTS/<label>-<pid>.json` (label from `$BENCH_SQL_LABEL`), flushed twice a
second (forked children too)."""

from __future__ import annotations

import atexit
import collections
import json
import os
import re
import threading
import time

_DIR = os.environ.get("BENCH_SQL_COUNTS")
_LABEL = os.environ.get("BENCH_SQL_LABEL", "process")
_counts: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()


def _kind(statement: str) -> str:
    if len(statement) < 20:
        return " ".join(statement.split()).upper()  # SELECT 1, a pool's ping
    words = statement.strip().split(None, 3)
    head = " ".join(words[:2]).upper() if words else "?"
    if head.startswith(("SELECT", "UPDATE", "INSERT", "DELETE")):
        table = re.search(r"\b(?:FROM|UPDATE|INTO)\s+(\w+)", statement, re.I)
        return f"{words[0].upper()} {table.group(1) if table else '?'}"
    return words[0].upper() if words else "?"


def _flush() -> None:
    with _lock:
        data = dict(_counts)
    path = os.path.join(_DIR or ".", f"{_LABEL}-{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def _flush_forever() -> None:
    while True:
        time.sleep(0.5)
        _flush()


def _start() -> None:
    _counts.clear()
    threading.Thread(target=_flush_forever, daemon=True).start()


if _DIR:
    # Counted at the driver, so that what SQLAlchemy sends on its own (a pool's pre-ping)
    # and what psycopg sends on its own (BEGIN before a transaction's first statement,
    # COMMIT, ROLLBACK, SAVEPOINT) is counted with the statements: every one is a round
    # trip to the server (an executemany's are pipelined, but each is a statement).
    import psycopg
    from psycopg._connection_base import BaseConnection

    def _add(kind: str, n: int = 1) -> None:
        with _lock:
            _counts[kind] += n

    _execute, _executemany, _copy = (
        psycopg.Cursor.execute,
        psycopg.Cursor.executemany,
        psycopg.Cursor.copy,
    )
    _command = BaseConnection._exec_command

    def _text(query) -> str:  # type: ignore[no-untyped-def]
        if isinstance(query, bytes):
            return query.decode()
        return query if isinstance(query, str) else "COMPOSED"  # psycopg.sql: its own

    def _counted_execute(self, query, *args, **kwargs):  # type: ignore[no-untyped-def]
        _add(_kind(_text(query)))
        return _execute(self, query, *args, **kwargs)

    def _counted_executemany(self, query, params_seq, *args, **kwargs):  # type: ignore[no-untyped-def]
        params_seq = list(params_seq)
        _add(_kind(_text(query)), len(params_seq))
        return _executemany(self, query, params_seq, *args, **kwargs)

    def _counted_copy(self, statement, *args, **kwargs):  # type: ignore[no-untyped-def]
        _add("COPY")
        return _copy(self, statement, *args, **kwargs)

    def _counted_command(self, command, *args, **kwargs):  # type: ignore[no-untyped-def]
        text = command.decode() if isinstance(command, bytes) else str(command)
        _add(text.split(None, 1)[0].upper() if text.strip() else "?")
        return _command(self, command, *args, **kwargs)

    psycopg.Cursor.execute = _counted_execute  # type: ignore[method-assign]
    psycopg.Cursor.executemany = _counted_executemany  # type: ignore[method-assign]
    psycopg.Cursor.copy = _counted_copy  # type: ignore[method-assign]
    BaseConnection._exec_command = _counted_command  # type: ignore[method-assign]

    _start()
    os.register_at_fork(after_in_child=_start)
    atexit.register(_flush)  # a short-lived process (the submit) counts to its end
