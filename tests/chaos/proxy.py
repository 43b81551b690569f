"""A loopback TCP proxy that can be cut: the network between workers and Postgres,
failing for real (established connections reset, new ones refused)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Self


class TcpProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._open = threading.Event()
        self._open.set()
        self._stop = threading.Event()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._cut_at: float | None = None
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self._listener.close()
        self._close_all()

    def cut(self) -> None:
        """Reset every connection now and refuse new ones until `restore()`."""
        self._open.clear()
        self._cut_at = time.monotonic()
        self._close_all()

    def wait_cut(self, seconds: float) -> None:
        """Block until the cut has lasted `seconds` (an outage of a set length)."""
        assert self._cut_at is not None
        remaining = self._cut_at + seconds - time.monotonic()
        if remaining > 0:
            self._stop.wait(remaining)

    def restore(self) -> None:
        self._open.set()

    def _close_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            _reset(*pair)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._open.is_set():
                conn.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                # cut() may have run since the check above: a pair it did not see must not
                # carry traffic through the outage
                if not self._open.is_set():
                    _reset(conn, upstream)
                    continue
                self._pairs.append((conn, upstream))
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # One side has ended: end the other for real. A bare close() would leave the
            # socket alive in the kernel, owned by no one, while the opposite pipe thread
            # sits in recv() on it; Postgres would then never hear of the end and keep the
            # session, idle in its transaction, with its locks.
            _reset(src, dst, hard=False)


def _reset(*socks: socket.socket, hard: bool = True) -> None:
    """End each socket so that its peer (Postgres) sees the connection die and rolls back
    its transaction: a reset when `hard` (data in flight dropped), else an orderly end.
    shutdown() first, because a close alone does not wake a pipe thread blocked in
    recv(), and the socket would live on until that returns."""
    for s in socks:
        with contextlib.suppress(OSError):
            if hard:
                s.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()
