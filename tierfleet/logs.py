"""Structured logs: one line per event, `key=value` pairs, a stable `action` key.

Call `setup_logging()` once where a process starts. Fields passed through `extra=` (the
job's id, tier, feature, ...) are printed; nothing else from the record is.

A line per job or per message is DEBUG, tierfleet's and Celery's ("Task ... received",
"succeeded in"): at a million jobs a day they would cost more than they tell, and the
ledger holds every attempt. INFO keeps what an operator acts on.
"""

from __future__ import annotations

import logging
import sys

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "color_message",  # uvicorn's copy of the message, in colour
}  # fmt: skip


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        parts = [
            self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            record.levelname.lower(),
            record.name,
            repr(record.getMessage()),
        ]
        parts += [f"{k}={v}" for k, v in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_PER_MESSAGE = ("celery.app.trace", "celery.worker.strategy")  # a line per task run


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    per_message = logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    for name in _PER_MESSAGE:
        logging.getLogger(name).setLevel(per_message)
