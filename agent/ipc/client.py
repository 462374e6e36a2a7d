"""The client side of the control socket (vps-agentctl): every failure an IpcError, a missing daemon
DaemonUnreachable."""

from __future__ import annotations

import grp
import json
import os
import socket
import time
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

from agent.ipc.wire import (
    MAX_ANSWER_LINE_BYTES,
    MAX_REQUEST_BYTES,
    MUTATING_VERBS,
    DaemonUnreachable,
    IpcError,
    encode_line,
)

# How long IpcClient waits before trying a full backlog again.
CONNECT_RETRY_PAUSE = 0.01


class IpcClient:
    """Talks to the daemon over its socket; every failure is an IpcError, a missing daemon DaemonUnreachable."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def _permission_denied(self, verb: str) -> str:
        """Who may connect: root, or for the read-only verbs a member of the socket's group (adm)."""
        try:
            group = grp.getgrgid(self.path.stat().st_gid).gr_name
        except (OSError, KeyError):
            group = "adm"
        if verb in MUTATING_VERBS:
            return f"permission denied connecting to {self.path}: {verb!r} changes the system and needs root (sudo)"
        return (
            f"permission denied connecting to {self.path}: run as root, or as a member of group {group} "
            f"(sudo adduser $USER {group}, then log in again)"
        )

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
        request = encode_line({"verb": verb, "args": dict(args)})
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
            raise DaemonUnreachable(self._permission_denied(verb)) from None
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
