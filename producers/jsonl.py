"""Reading a JSONL input for bulk submission: streamed, line by line, never whole.

`open_input("-")` spools standard input to a temporary file, so that it can be read twice
(once to validate, once to submit) like a file; `.gz` inputs are decompressed on the fly.
A line longer than the limit is skipped over in pieces, so it never sits in memory whole.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tierfleet.errors import InvalidEnvelope

_PIECE = 1 << 20


@dataclass(frozen=True, slots=True)
class RawLine:
    no: int  # 1-based
    data: bytes  # without the newline; empty when `oversized`
    size: int  # bytes, without the newline
    last: bool  # the file's last line
    newline: bool  # ended with a newline (a last line without one may be truncated)
    oversized: bool = False


@dataclass(frozen=True, slots=True)
class Input:
    path: Path
    name: str  # what the user called it
    gzip: bool
    held: bytes | None = None  # the input itself, read from memory instead of `path`

    @classmethod
    def of_bytes(cls, data: bytes, name: str) -> Input:
        """An input held in memory (an upload): nothing of it is written to disk."""
        return cls(Path(name), name, gzip=False, held=data)

    def open(self) -> IO[bytes]:
        if self.gzip:
            stored = self.path if self.held is None else io.BytesIO(self.held)
            return gzip.open(stored, "rb")  # type: ignore[return-value]
        return self.raw()

    def raw(self) -> IO[bytes]:
        """The bytes as stored (a .gz compressed)."""
        return self.path.open("rb") if self.held is None else io.BytesIO(self.held)

    def size(self) -> int:
        return self.path.stat().st_size if self.held is None else len(self.held)


@contextlib.contextmanager
def open_input(source: str) -> Iterator[Input]:
    """`source` is a path (`.jsonl`, `.jsonl.gz`) or `-` for standard input."""
    if source != "-":
        path = Path(source)
        if path.is_dir():
            raise InvalidEnvelope(f"{source}: a directory, not a JSON lines file")
        if not path.is_file():
            raise InvalidEnvelope(f"{source}: no such file")
        yield Input(path, source, _is_gzip(path))
        return
    with tempfile.NamedTemporaryFile(prefix="tierfleet-stdin-", suffix=".jsonl") as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool, _PIECE)
        spool.flush()
        path = Path(spool.name)
        yield Input(path, "<stdin>", _is_gzip(path))


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == b"\x1f\x8b"


def read_lines(
    source: Input, max_line_bytes: int, digest: hashlib._Hash | None = None
) -> Iterator[RawLine]:
    """Every line of `source`, numbered; `digest`, when given, is fed every byte read.
    A line ends at "\\n"; a "\\r" before it (or at the very end) is not part of it, nor
    of its size, so a CRLF file has the same limit as an LF one."""
    with source.open() as f:
        no = 0
        # Room for "\\r\\n" after the limit: a line just at it is read whole.
        pending = f.readline(max_line_bytes + 2)
        while pending:
            no += 1
            line = pending
            if digest is not None:
                digest.update(line)
            if line.endswith(b"\n") or len(line) <= max_line_bytes + 1:
                # whole: a read stops short of its limit only at a newline or at the end
                newline = line.endswith(b"\n")
                data = (line[:-1] if newline else line).removesuffix(b"\r")
                size = len(data)
                oversized = size > max_line_bytes
            else:  # over the limit: skip the rest in pieces, never holding it whole
                size, tail = len(line), line[-2:]
                while line and not line.endswith(b"\n"):
                    line = f.readline(_PIECE)
                    size += len(line)
                    tail = (tail + line)[-2:]
                    if digest is not None:
                        digest.update(line)
                newline = tail.endswith(b"\n")
                size -= int(newline) + int((tail[:-1] if newline else tail).endswith(b"\r"))
                data, oversized = b"", True
            pending = f.readline(max_line_bytes + 2)
            yield RawLine(no, b"" if oversized else data, size, not pending, newline, oversized)
