"""The local control socket: a JSON-lines protocol over a Unix stream socket, with SO_PEERCRED checks.

Wire format (one request per connection):
  client -> {"verb": "status", "args": {...}}\\n
  server -> {"ok": true, "result": <json>}\\n                       then closes, or
            {"ok": false, "error": "<message>"}\\n                   then closes, or
            {"ok": true, "stream": true}\\n then {"item": {...}}\\n per item until the stream ends;
            a stream that fails part-way ends with {"error": "<message>"}\\n.
"""

from __future__ import annotations

import grp
import itertools
import json
import logging
import os
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
# A client that connects and never sends its request must not hold a server thread forever.
REQUEST_READ_TIMEOUT = 10.0
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
            listener.listen(64)
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

    def _accept_connections(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                # EMFILE and friends: log and keep serving rather than lose the control socket.
                log.exception("accept() failed on %s", self.path)
                self._stopping.wait(0.1)
                continue
            thread_name = f"ipc-conn-{next(self._connection_numbers)}"
            thread = threading.Thread(target=self._serve_connection, args=(conn,), name=thread_name, daemon=True)
            with self._connections_lock:
                self._connections[conn] = thread
            thread.start()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._answer(conn)
        except OSError:
            # The client went away mid-answer; nothing left to tell it.
            pass
        except Exception:
            # A bug here must cost one connection, never the serving thread's traceback on stderr.
            log.exception("IPC connection failed on %s", self.path)
        finally:
            with self._connections_lock:
                self._connections.pop(conn, None)

    def _answer(self, conn: socket.socket) -> None:
        peer = _peer_credentials(conn)
        conn.settimeout(REQUEST_READ_TIMEOUT)
        try:
            raw_request = _read_request(conn)
        except IpcError as exc:
            _send_line(conn, {"ok": False, "error": exc.message})
            _discard_unread_request(conn)
            return
        except TimeoutError:
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
            self._stream_items(conn, result)
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
            # Runs a generator's finally (unsubscribe, close files) as soon as the client is gone.
            close = getattr(items, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    log.exception("closing an IPC stream failed")


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
            sock.connect(os.fspath(self.path))
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
            sock.close()
            raise DaemonUnreachable(f"{self.path} hung up while sending the request: {exc}") from None
        return sock

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


def _peer_credentials(conn: socket.socket) -> PeerCred:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(_PEERCRED_FORMAT))
    pid, uid, gid = struct.unpack(_PEERCRED_FORMAT, raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)


def _read_request(conn: socket.socket) -> bytes | None:
    """The request line, without its newline; None when the client sent nothing at all."""
    received = bytearray()
    while True:
        newline_at = received.find(b"\n")
        if newline_at >= 0:
            if newline_at > MAX_REQUEST_BYTES:
                break
            return bytes(received[:newline_at])
        if len(received) > MAX_REQUEST_BYTES:
            break
        chunk = conn.recv(MAX_REQUEST_BYTES + 1)
        if not chunk:
            # Tolerate a client that half-closes instead of sending the newline (e.g. `printf ... | socat`).
            return bytes(received) if received else None
        received += chunk
    raise IpcError(f"request too large: more than {MAX_REQUEST_BYTES} bytes")


def _discard_unread_request(conn: socket.socket) -> None:
    """Half-close, then swallow what is left of an oversized request so the client can read our answer.

    Closing with unread bytes makes Linux reset the connection, and the client would lose the error.
    """
    conn.shutdown(socket.SHUT_WR)
    discarded = 0
    try:
        while discarded <= MAX_DISCARDED_BYTES:
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
