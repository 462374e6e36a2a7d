"""The server side of the control socket: one thread per admitted connection, under the caps the module
docstring of agent.ipc explains."""

from __future__ import annotations

import grp
import itertools
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.ipc.connection import (
    close_iterator,
    discard_unread_request,
    hung_up,
    read_request,
    refuse,
    send_line,
    send_line_quietly,
    send_refusal,
    shutdown_quietly,
    socket_has_listener,
)
from agent.ipc.wire import Handler, IpcError, PeerCred, check_permission, encode_line, internal_error, parse_request

# From accept() to the request's newline, however the client spaces its bytes: a client sending one
# byte a second must not hold a thread and an fd for ever.
REQUEST_DEADLINE = 5.0
# The caps on what clients hold at once. Each connection is one fd and one thread until it ends.
# A non-root uid: enough for a few `events -f` and a monitoring script's status calls.
MAX_CONNECTIONS_PER_UID = 16
# `events --follow` never ends by itself: a uid's streams must leave it room for status calls.
MAX_STREAMS_PER_UID = 4
# All non-root uids together (several members of adm, each at its cap).
MAX_UNPRIVILEGED_CONNECTIONS = 64
# Root's own, never taken by the others: root's requests are served whatever the others hold.
MAX_ROOT_CONNECTIONS = 32
# accept() failing (EMFILE, ENFILE, ENOBUFS, ENOMEM: the listener stays readable) is retried after a
# pause that doubles up to the maximum, instead of spinning and logging a traceback each time.
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0
# A flood must not become a log storm: each kind of trouble is logged at most once a period.
LOG_PERIOD = 60.0
# Connections the kernel queues before accept(): a burst beyond it makes connect() fail with EAGAIN
# (clients retry), and queued ones cost the agent no fd until it accepts (and refuses) them.
LISTEN_BACKLOG = 256
# stop() should not hang on a handler stuck in a long operation; connection threads are daemons anyway.
CONNECTION_JOIN_TIMEOUT = 2.0

_PEERCRED_FORMAT = "3i"

log = logging.getLogger("agent.ipc")  # the name the journal and the tests have always known


class _ThrottledLog:
    """Logs each kind of trouble at most once a period, with how many more were seen in between."""

    def __init__(self, period: float) -> None:
        self._period = period
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def warning(self, kind: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._period:
                self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
                return
            self._last[kind] = now
            unlogged = self._unlogged.pop(kind, 0)
        if unlogged:
            message += f" ({unlogged} more like it in the last {self._period:g}s)"
        log.warning("%s", message)


class IpcServer:
    """Serves requests on a Unix socket: one thread per connection, the handler decides what verbs mean.

    The handler runs concurrently for concurrent clients, so it must be thread-safe.
    """

    def __init__(self, path: Path, handler: Handler, *, mode: int = 0o660, group: str | None = "adm") -> None:
        self.path = Path(path)
        self._handler = handler
        self._mode = mode
        self._group = group
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connections_lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._connection_numbers = itertools.count(1)
        self._socket_identity: tuple[int, int] | None = None
        # guarded by _connections_lock: open connections and streams per uid
        self._open_by_uid: dict[int, int] = {}
        self._streams_by_uid: dict[int, int] = {}
        self._counts: dict[str, int] = dict.fromkeys(
            ("refused_over_cap", "refused_streams", "request_deadline", "thread_start_failed", "accept_failed"), 0
        )
        self._throttled = _ThrottledLog(LOG_PERIOD)

    def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError(f"IPC server on {self.path} is already started")
        self._prepare_socket_path()
        # Bind under a temporary name and rename into place, so the socket never exists with umask permissions.
        staging_path = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        staging_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(os.fspath(staging_path))
            os.chmod(staging_path, self._mode)
            self._chown_to_group(staging_path)
            listener.listen(LISTEN_BACKLOG)
            os.rename(staging_path, self.path)
            bound = os.lstat(self.path)
        except BaseException:
            listener.close()
            staging_path.unlink(missing_ok=True)
            raise
        self._listener = listener
        self._socket_identity = (bound.st_dev, bound.st_ino)
        self._stopping.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_connections, args=(listener,), name=f"ipc-accept:{self.path.name}", daemon=True
        )
        self._accept_thread.start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopping.set()
        # shutdown() wakes the thread blocked in accept(); close() alone would not on Linux.
        shutdown_quietly(listener)
        listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join()
            self._accept_thread = None
        with self._connections_lock:
            open_connections = dict(self._connections)
        for conn in open_connections:
            # Wakes threads blocked reading a request or writing to a client that stopped reading.
            shutdown_quietly(conn)
        deadline = time.monotonic() + CONNECTION_JOIN_TIMEOUT
        for thread in open_connections.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        try:
            current = os.lstat(self.path)
        except FileNotFoundError:
            return
        # Only remove our own socket, not one a newer server has since put in its place.
        if (current.st_dev, current.st_ino) == self._socket_identity:
            os.unlink(self.path)

    def _prepare_socket_path(self) -> None:
        if not self.path.parent.exists():
            self.path.parent.mkdir(mode=0o755, parents=True)
        try:
            existing = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(existing.st_mode):
            raise FileExistsError(f"{self.path} exists and is not a socket; refusing to replace it")
        if socket_has_listener(self.path):
            raise FileExistsError(f"another process is already serving on {self.path}")
        # A socket file with no listener is left over from a daemon that died without cleaning up.
        self.path.unlink()

    def _chown_to_group(self, path: Path) -> None:
        if self._group is None or os.geteuid() != 0:
            return
        try:
            gid = grp.getgrnam(self._group).gr_gid
        except KeyError:
            return
        os.chown(path, 0, gid)

    def stats(self) -> dict[str, Any]:
        """What clients hold now and how often the caps and the system said no since start()."""
        with self._connections_lock:
            return {
                "connections": sum(self._open_by_uid.values()),
                "streams": sum(self._streams_by_uid.values()),
                "by_uid": {str(uid): n for uid, n in sorted(self._open_by_uid.items())},
                **self._counts,
            }

    def _accept_connections(self, listener: socket.socket) -> None:
        backoff = ACCEPT_BACKOFF_MIN
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                self._count("accept_failed")
                self._throttled.warning("accept", f"accept() on {self.path} failed: {exc.strerror or exc}; retrying")
                # EMFILE and friends leave the listener readable: without a pause this would spin
                self._stopping.wait(backoff)
                backoff = min(2 * backoff, ACCEPT_BACKOFF_MAX)
                continue
            backoff = ACCEPT_BACKOFF_MIN
            try:
                self._take(conn, deadline=time.monotonic() + REQUEST_DEADLINE)
            except Exception as exc:
                # the accept thread is the control socket: a bug here costs one connection, never the socket
                conn.close()
                self._throttled.warning("take", f"taking a connection on {self.path} failed: {internal_error(exc)}")

    def _take(self, conn: socket.socket, deadline: float) -> None:
        """Admit the connection to a thread of its own, or answer it over its cap and close it."""
        try:
            peer = _peer_credentials(conn)
        except OSError:
            conn.close()  # gone already
            return
        refusal = self._admit(peer.uid)
        if refusal is not None:
            self._count("refused_over_cap")
            self._throttled.warning("refused", f"refused a connection on {self.path} (pid {peer.pid}): {refusal}")
            refuse(conn, refusal)
            return
        try:
            thread_name = f"ipc-conn-{next(self._connection_numbers)}"
            thread = threading.Thread(
                target=self._serve_connection, args=(conn, peer, deadline), name=thread_name, daemon=True
            )
            with self._connections_lock:
                self._connections[conn] = thread
            thread.start()
        except Exception as exc:  # RuntimeError "can't start new thread": TasksMax, memory
            with self._connections_lock:
                self._connections.pop(conn, None)
            self._release(peer.uid)
            self._count("thread_start_failed")
            self._throttled.warning("thread", f"no thread for a connection on {self.path}: {exc}; answered busy")
            refuse(conn, f"the agent is busy (no thread for this connection: {exc}); try again")

    def _admit(self, uid: int) -> str | None:
        """Count the connection in, or say which cap it is over."""
        with self._connections_lock:
            held = self._open_by_uid.get(uid, 0)
            if uid == 0:
                if held >= MAX_ROOT_CONNECTIONS:
                    return f"too many connections from uid 0 (cap {MAX_ROOT_CONNECTIONS})"
            elif held >= MAX_CONNECTIONS_PER_UID:
                return f"too many connections from uid {uid} (cap {MAX_CONNECTIONS_PER_UID})"
            elif sum(n for u, n in self._open_by_uid.items() if u != 0) >= MAX_UNPRIVILEGED_CONNECTIONS:
                return (
                    f"too many connections from uids other than root (cap {MAX_UNPRIVILEGED_CONNECTIONS}); "
                    f"uid {uid} holds {held}"
                )
            self._open_by_uid[uid] = held + 1
        return None

    def _release(self, uid: int) -> None:
        with self._connections_lock:
            _count_out(self._open_by_uid, uid)

    def _admit_stream(self, uid: int) -> str | None:
        """Count a stream in (root's are bounded by its connection cap alone), or say it is over the cap."""
        with self._connections_lock:
            held = self._streams_by_uid.get(uid, 0)
            if uid != 0 and held >= MAX_STREAMS_PER_UID:
                return f"too many event streams from uid {uid} (cap {MAX_STREAMS_PER_UID})"
            self._streams_by_uid[uid] = held + 1
        return None

    def _release_stream(self, uid: int) -> None:
        with self._connections_lock:
            _count_out(self._streams_by_uid, uid)

    def _count(self, what: str) -> None:
        with self._connections_lock:
            self._counts[what] += 1

    def _serve_connection(self, conn: socket.socket, peer: PeerCred, deadline: float) -> None:
        try:
            self._answer(conn, peer, deadline)
        except OSError:
            # The client went away mid-answer; nothing left to tell it.
            pass
        except Exception:
            # A bug here must cost one connection, never the serving thread's traceback on stderr.
            log.exception("IPC connection failed on %s", self.path)
        finally:
            with self._connections_lock:
                self._connections.pop(conn, None)
            self._release(peer.uid)
            # after the release: a client that sees the close may connect again at once
            conn.close()

    def _answer(self, conn: socket.socket, peer: PeerCred, deadline: float) -> None:
        try:
            raw_request = read_request(conn, deadline)
        except IpcError as exc:
            send_line(conn, {"ok": False, "error": exc.message})
            discard_unread_request(conn, deadline)
            return
        except TimeoutError:
            self._count("request_deadline")
            send_refusal(conn, f"request not received within {REQUEST_DEADLINE:g}s of connecting")
            return
        if raw_request is None:
            return  # connected and hung up without a word, e.g. a liveness probe
        # Answers can be slow to consume (a paused `events -f | less`); the client sets the pace.
        conn.settimeout(None)
        try:
            request = parse_request(raw_request, peer)
            check_permission(request)
            result = self._handler(request)
        except IpcError as exc:
            send_line(conn, {"ok": False, "error": exc.message})
            return
        except Exception as exc:
            log.exception("IPC handler failed for a request from pid %d", peer.pid)
            send_line(conn, {"ok": False, "error": internal_error(exc)})
            return
        if isinstance(result, Iterator):
            refusal = self._admit_stream(peer.uid)
            if refusal is not None:
                close_iterator(result)
                self._count("refused_streams")
                self._throttled.warning("streams", f"refused a stream on {self.path} (pid {peer.pid}): {refusal}")
                send_line(conn, {"ok": False, "error": refusal})
                return
            try:
                self._stream_items(conn, result)
            finally:
                self._release_stream(peer.uid)
            return
        try:
            answer = encode_line({"ok": True, "result": result})
        except (TypeError, ValueError) as exc:
            answer = encode_line({"ok": False, "error": internal_error(exc)})
        conn.sendall(answer, socket.MSG_NOSIGNAL)

    def _stream_items(self, conn: socket.socket, items: Iterator[Any]) -> None:
        try:
            send_line(conn, {"ok": True, "stream": True})
            while True:
                # An iterator failure ends the stream with an error line; a send failure means the client left.
                try:
                    item = next(items)
                    if item is None:
                        if hung_up(conn):
                            return  # gone: its thread, fd and place under the caps go now, not at the next item
                        continue
                    if not isinstance(item, dict):
                        raise TypeError(f"stream item must be a JSON object, got {type(item).__name__}")
                    line = encode_line({"item": item})
                except StopIteration:
                    return
                except IpcError as exc:
                    send_line_quietly(conn, {"error": exc.message})
                    return
                except Exception as exc:
                    log.exception("IPC stream failed")
                    send_line_quietly(conn, {"error": internal_error(exc)})
                    return
                conn.sendall(line, socket.MSG_NOSIGNAL)
        except OSError:
            return  # the client stopped reading; the finally below releases the iterator
        finally:
            close_iterator(items)


def _peer_credentials(conn: socket.socket) -> PeerCred:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(_PEERCRED_FORMAT))
    pid, uid, gid = struct.unpack(_PEERCRED_FORMAT, raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)


def _count_out(held: dict[int, int], uid: int) -> None:
    """One fewer held by uid; a uid that holds none leaves the table (stats list only who holds some)."""
    left = held.get(uid, 0) - 1
    if left > 0:
        held[uid] = left
    else:
        held.pop(uid, None)
