"""One connection, as the server sees it: its request read within a deadline, its answer lines, its
refusal, whether its client is still there."""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from agent.ipc.wire import MAX_REQUEST_BYTES, IpcError, encode_line

# How much of an oversized request we swallow before giving up on a polite answer.
MAX_DISCARDED_BYTES = 16 * MAX_REQUEST_BYTES

log = logging.getLogger("agent.ipc")  # the name the journal and the tests have always known


def read_request(conn: socket.socket, deadline: float) -> bytes | None:
    """The request line, without its newline; None when the client sent nothing at all.

    TimeoutError once the deadline (time.monotonic()) passes, however the bytes trickle in."""
    received = bytearray()
    while True:
        newline_at = received.find(b"\n")
        if newline_at >= 0:
            if newline_at > MAX_REQUEST_BYTES:
                break
            return bytes(received[:newline_at])
        if len(received) > MAX_REQUEST_BYTES:
            break
        _time_left_until(conn, deadline)
        chunk = conn.recv(MAX_REQUEST_BYTES + 1)
        if not chunk:
            # Tolerate a client that half-closes instead of sending the newline (e.g. `printf ... | socat`).
            return bytes(received) if received else None
        received += chunk
    raise IpcError(f"request too large: more than {MAX_REQUEST_BYTES} bytes")


def _time_left_until(conn: socket.socket, deadline: float) -> None:
    """The socket's timeout: what is left until the deadline; TimeoutError when nothing is."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline has passed")
    conn.settimeout(left)


def discard_unread_request(conn: socket.socket, deadline: float) -> None:
    """Half-close, then swallow what is left of an oversized request so the client can read our answer.

    Closing with unread bytes makes Linux reset the connection, and the client would lose the error.
    Up to the request deadline, but at least a second: a client that sent 64 KiB fast deserves the answer.
    """
    conn.shutdown(socket.SHUT_WR)
    deadline = max(deadline, time.monotonic() + 1.0)
    discarded = 0
    try:
        while discarded <= MAX_DISCARDED_BYTES:
            _time_left_until(conn, deadline)
            chunk = conn.recv(65536)
            if not chunk:
                return
            discarded += len(chunk)
    except TimeoutError:
        return


def send_line(conn: socket.socket, message: Mapping[str, Any]) -> None:
    conn.sendall(encode_line(message), socket.MSG_NOSIGNAL)


def send_line_quietly(conn: socket.socket, message: Mapping[str, Any]) -> None:
    try:
        send_line(conn, message)
    except (OSError, TypeError, ValueError):
        pass


def refuse(conn: socket.socket, message: str) -> None:
    """One error line, then the close. The client reads the line even if its request is still unread
    here (Linux queues the reset after it)."""
    send_refusal(conn, message)
    conn.close()


def send_refusal(conn: socket.socket, message: str) -> None:
    """One error line, never waiting for the client (the accept thread calls this)."""
    try:
        conn.send(encode_line({"ok": False, "error": message}), socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
    except OSError:
        pass


def hung_up(conn: socket.socket) -> bool:
    """The client closed its end (POLLHUP); one that only half-closed after its request still reads."""
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    return any(revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, revents in poller.poll(0))


def close_iterator(items: Iterator[Any]) -> None:
    """Runs a generator's finally (unsubscribe, close files) as soon as the client is gone."""
    close = getattr(items, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            log.exception("closing an IPC stream failed")


def shutdown_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def socket_has_listener(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
        return True
