"""The local control socket: a JSON-lines protocol over a Unix stream socket, with SO_PEERCRED checks.

Wire format (one request per connection):
  client -> {"verb": "status", "args": {...}}\\n
  server -> {"ok": true, "result": <json>}\\n                       then closes, or
            {"ok": false, "error": "<message>"}\\n                   then closes, or
            {"ok": true, "stream": true}\\n then {"item": {...}}\\n per item until the stream ends;
            a stream that fails part-way ends with {"error": "<message>"}\\n.
A streaming handler returns an iterator of JSON objects; it may also yield None (nothing new, nothing
sent), the server's chance to end a stream whose client has gone before the next item would show it.

Every connection costs the agent an fd and a thread, so what a client may hold is capped (DESIGN.md,
"Who we defend against": a member of adm may connect): per uid, for all uids but root together, and
for root on its own, so root is always served; `events --follow` streams per uid; and the whole request
line must arrive within REQUEST_DEADLINE of accept(). A client over a cap gets one error line, then the
close. LimitNOFILE= and TasksMax= in systemd/vps-agent.service are sized from these caps.
"""

from __future__ import annotations

import grp
import itertools
import json
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
import types
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MUTATING_VERBS: frozenset[str] = frozenset({"pause", "resume", "converge", "reload", "upgrade", "confirm"})

MAX_REQUEST_BYTES = 64 * 1024
# How much of an oversized request we swallow before giving up on a polite answer.
MAX_DISCARDED_BYTES = 16 * MAX_REQUEST_BYTES
# Answers carry diffs and event batches, so they may be far larger than requests, but not unbounded.
MAX_ANSWER_LINE_BYTES = 16 * 1024 * 1024
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
# How long IpcClient waits before trying a full backlog again.
CONNECT_RETRY_PAUSE = 0.01
# stop() should not hang on a handler stuck in a long operation; connection threads are daemons anyway.
CONNECTION_JOIN_TIMEOUT = 2.0

_PEERCRED_FORMAT = "3i"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerCred:
    """Who is on the other end of the socket, as the kernel recorded it at connect() time."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class Request:
    verb: str
    args: Mapping[str, Any]
    peer: PeerCred


class IpcError(Exception):
    """The daemon answered with an error (or a handler wants to answer with one)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DaemonUnreachable(IpcError):
    """No daemon answered on the socket: missing, refused, timed out or hung up."""


Handler = Callable[[Request], Any]


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
        _shutdown_quietly(listener)
        listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join()
            self._accept_thread = None
        with self._connections_lock:
            open_connections = dict(self._connections)
        for conn in open_connections:
            # Wakes threads blocked reading a request or writing to a client that stopped reading.
            _shutdown_quietly(conn)
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
        if _socket_has_listener(self.path):
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
                self._throttled.warning("take", f"taking a connection on {self.path} failed: {_internal_error(exc)}")

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
            _refuse(conn, refusal)
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
            _refuse(conn, f"the agent is busy (no thread for this connection: {exc}); try again")

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
            left = self._open_by_uid.get(uid, 0) - 1
            if left > 0:
                self._open_by_uid[uid] = left
            else:
                self._open_by_uid.pop(uid, None)

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
            left = self._streams_by_uid.get(uid, 0) - 1
            if left > 0:
                self._streams_by_uid[uid] = left
            else:
                self._streams_by_uid.pop(uid, None)

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
            raw_request = _read_request(conn, deadline)
        except IpcError as exc:
            _send_line(conn, {"ok": False, "error": exc.message})
            _discard_unread_request(conn, deadline)
            return
        except TimeoutError:
            self._count("request_deadline")
            _send_refusal(conn, f"request not received within {REQUEST_DEADLINE:g}s of connecting")
            return
        if raw_request is None:
            return  # connected and hung up without a word, e.g. a liveness probe
        # Answers can be slow to consume (a paused `events -f | less`); the client sets the pace.
        conn.settimeout(None)
        try:
            request = _parse_request(raw_request, peer)
            _check_permission(request)
            result = self._handler(request)
        except IpcError as exc:
            _send_line(conn, {"ok": False, "error": exc.message})
            return
        except Exception as exc:
            log.exception("IPC handler failed for a request from pid %d", peer.pid)
            _send_line(conn, {"ok": False, "error": _internal_error(exc)})
            return
        if isinstance(result, Iterator):
            refusal = self._admit_stream(peer.uid)
            if refusal is not None:
                _close_iterator(result)
                self._count("refused_streams")
                self._throttled.warning("streams", f"refused a stream on {self.path} (pid {peer.pid}): {refusal}")
                _send_line(conn, {"ok": False, "error": refusal})
                return
            try:
                self._stream_items(conn, result)
            finally:
                self._release_stream(peer.uid)
            return
        try:
            answer = _encode_line({"ok": True, "result": result})
        except (TypeError, ValueError) as exc:
            answer = _encode_line({"ok": False, "error": _internal_error(exc)})
        conn.sendall(answer, socket.MSG_NOSIGNAL)

    def _stream_items(self, conn: socket.socket, items: Iterator[Any]) -> None:
        try:
            _send_line(conn, {"ok": True, "stream": True})
            while True:
                # An iterator failure ends the stream with an error line; a send failure means the client left.
                try:
                    item = next(items)
                    if item is None:
                        if _hung_up(conn):
                            return  # gone: its thread, fd and place under the caps go now, not at the next item
                        continue
                    if not isinstance(item, dict):
                        raise TypeError(f"stream item must be a JSON object, got {type(item).__name__}")
                    line = _encode_line({"item": item})
                except StopIteration:
                    return
                except IpcError as exc:
                    _send_line_quietly(conn, {"error": exc.message})
                    return
                except Exception as exc:
                    log.exception("IPC stream failed")
                    _send_line_quietly(conn, {"error": _internal_error(exc)})
                    return
                conn.sendall(line, socket.MSG_NOSIGNAL)
        except OSError:
            return  # the client stopped reading; the finally below releases the iterator
        finally:
            _close_iterator(items)


class IpcClient:
    """Talks to the daemon over its socket; every failure is an IpcError, a missing daemon DaemonUnreachable."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def call(self, verb: str, **args: Any) -> Any:
        with self._connect_and_send(verb, args) as sock, sock.makefile("rb") as answers:
            answer = self._read_answer(answers)
            if answer.get("stream") is True:
                raise IpcError(f"{verb!r} streams its answer; use IpcClient.stream()")
            return answer.get("result")

    def stream(self, verb: str, **args: Any) -> Generator[dict[str, Any], None, None]:
        """Yield streamed items until the server closes; errors before the first item raise here, not later."""
        sock = self._connect_and_send(verb, args)
        try:
            answers = sock.makefile("rb")
            answer = self._read_answer(answers)
            if answer.get("stream") is not True:
                raise IpcError(f"{verb!r} does not stream its answer; use IpcClient.call()")
            # Follow mode may stay quiet for hours; only connect and the first answer are timed.
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return self._streamed_items(sock, answers)

    def _streamed_items(self, sock: socket.socket, answers: Any) -> Generator[dict[str, Any], None, None]:
        with sock, answers:
            while True:
                line = self._read_line(answers)
                if line is None:
                    return
                message = self._decode(line)
                if "error" in message:
                    raise IpcError(str(message["error"]))
                item = message.get("item")
                if not isinstance(item, dict):
                    raise IpcError(f"unexpected line in the stream from {self.path}: {line[:200]!r}")
                yield item

    def _connect_and_send(self, verb: str, args: Mapping[str, Any]) -> socket.socket:
        request = _encode_line({"verb": verb, "args": dict(args)})
        if len(request) > MAX_REQUEST_BYTES:
            raise IpcError(f"request too large: {len(request)} bytes (the limit is {MAX_REQUEST_BYTES})")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            self._connect(sock)
        except FileNotFoundError:
            sock.close()
            raise DaemonUnreachable(f"no daemon socket at {self.path}: is vps-agent running?") from None
        except ConnectionRefusedError:
            sock.close()
            raise DaemonUnreachable(f"nothing listens on {self.path}: vps-agent is not running") from None
        except PermissionError:
            sock.close()
            raise DaemonUnreachable(
                f"permission denied connecting to {self.path}: run as root or as a member of its group"
            ) from None
        except TimeoutError:
            sock.close()
            raise DaemonUnreachable(f"timed out after {self.timeout:g}s connecting to {self.path}") from None
        except OSError as exc:
            sock.close()
            raise DaemonUnreachable(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(request, socket.MSG_NOSIGNAL)
        except OSError as exc:
            # a server over its caps answers and closes before reading: its reason may be waiting for us
            refusal = _refusal_left_behind(sock)
            sock.close()
            if refusal is not None:
                raise IpcError(refusal) from None
            raise DaemonUnreachable(f"{self.path} hung up while sending the request: {exc}") from None
        return sock

    def _connect(self, sock: socket.socket) -> None:
        """connect(), again while the listen backlog is full (EAGAIN, at once on a Unix socket with a
        timeout): a burst of other clients must not turn root's call away before the server refused them."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                sock.connect(os.fspath(self.path))
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError from None
                time.sleep(CONNECT_RETRY_PAUSE)

    def _read_answer(self, answers: Any) -> dict[str, Any]:
        line = self._read_line(answers)
        if line is None:
            raise DaemonUnreachable(f"the daemon on {self.path} closed the connection without answering")
        answer = self._decode(line)
        if answer.get("ok") is True:
            return answer
        raise IpcError(str(answer.get("error", f"malformed answer from {self.path}: {line[:200]!r}")))

    def _read_line(self, answers: Any) -> bytes | None:
        try:
            line: bytes = answers.readline(MAX_ANSWER_LINE_BYTES + 1)
        except TimeoutError:
            raise DaemonUnreachable(f"timed out after {self.timeout:g}s waiting for {self.path}") from None
        except OSError as exc:
            raise DaemonUnreachable(f"lost the connection to {self.path}: {exc}") from None
        if not line:
            return None
        if not line.endswith(b"\n"):
            if len(line) > MAX_ANSWER_LINE_BYTES:
                raise IpcError(f"answer from {self.path} is larger than {MAX_ANSWER_LINE_BYTES} bytes")
            raise DaemonUnreachable(f"the daemon on {self.path} hung up in the middle of an answer")
        return line

    def _decode(self, line: bytes) -> dict[str, Any]:
        try:
            message = json.loads(line)
        except ValueError:
            raise IpcError(f"malformed answer from {self.path}: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise IpcError(f"malformed answer from {self.path}: {line[:200]!r}")
        return message


def _refusal_left_behind(sock: socket.socket) -> str | None:
    """The error line a server sent before it hung up, if one is already here."""
    try:
        sock.setblocking(False)
        data = sock.recv(65536)
    except OSError:
        return None
    line, newline, _ = data.partition(b"\n")
    try:
        answer = json.loads(line) if newline else None
    except ValueError:
        return None
    if isinstance(answer, dict) and answer.get("ok") is False and isinstance(answer.get("error"), str):
        return answer["error"]
    return None


def _peer_credentials(conn: socket.socket) -> PeerCred:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(_PEERCRED_FORMAT))
    pid, uid, gid = struct.unpack(_PEERCRED_FORMAT, raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)


def _read_request(conn: socket.socket, deadline: float) -> bytes | None:
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


def _discard_unread_request(conn: socket.socket, deadline: float) -> None:
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


def _parse_request(raw_request: bytes, peer: PeerCred) -> Request:
    try:
        message = json.loads(raw_request)
    except ValueError as exc:
        raise IpcError(f"bad request: not valid JSON ({exc})") from None
    if not isinstance(message, dict):
        raise IpcError(f"bad request: expected a JSON object, got {type(message).__name__}")
    verb = message.get("verb")
    if not isinstance(verb, str) or not verb:
        raise IpcError('bad request: "verb" must be a non-empty string')
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise IpcError(f'bad request: "args" must be a JSON object, got {type(args).__name__}')
    # Read-only view: handlers run concurrently and must not mutate a request they share with nobody.
    return Request(verb=verb, args=types.MappingProxyType(args), peer=peer)


def _check_permission(request: Request) -> None:
    if request.verb in MUTATING_VERBS and request.peer.uid != 0:
        raise IpcError(
            f"permission denied: {request.verb!r} changes the system and needs root (uid 0); "
            f"you are uid {request.peer.uid}"
        )


def _internal_error(exc: BaseException) -> str:
    return f"internal error: {type(exc).__name__}: {exc}"


def _encode_line(message: Mapping[str, Any]) -> bytes:
    # allow_nan=False: NaN is not JSON and would break strict parsers on the other end.
    return json.dumps(message, allow_nan=False).encode() + b"\n"


def _send_line(conn: socket.socket, message: Mapping[str, Any]) -> None:
    conn.sendall(_encode_line(message), socket.MSG_NOSIGNAL)


def _send_line_quietly(conn: socket.socket, message: Mapping[str, Any]) -> None:
    try:
        _send_line(conn, message)
    except (OSError, TypeError, ValueError):
        pass


def _refuse(conn: socket.socket, message: str) -> None:
    """One error line, then the close. The client reads the line even if its request is still unread
    here (Linux queues the reset after it)."""
    _send_refusal(conn, message)
    conn.close()


def _send_refusal(conn: socket.socket, message: str) -> None:
    """One error line, never waiting for the client (the accept thread calls this)."""
    try:
        conn.send(_encode_line({"ok": False, "error": message}), socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
    except OSError:
        pass


def _hung_up(conn: socket.socket) -> bool:
    """The client closed its end (POLLHUP); one that only half-closed after its request still reads."""
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    return any(revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, revents in poller.poll(0))


def _close_iterator(items: Iterator[Any]) -> None:
    """Runs a generator's finally (unsubscribe, close files) as soon as the client is gone."""
    close = getattr(items, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            log.exception("closing an IPC stream failed")


def _shutdown_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _socket_has_listener(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
        return True
