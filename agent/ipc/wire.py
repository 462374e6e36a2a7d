"""What both ends of the control socket share: the request, who sent it, the errors, one JSON line."""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MUTATING_VERBS: frozenset[str] = frozenset({"pause", "resume", "converge", "reload", "upgrade", "confirm"})
MAX_REQUEST_BYTES = 64 * 1024
# Answers carry diffs and event batches, so they may be far larger than requests, but not unbounded.
MAX_ANSWER_LINE_BYTES = 16 * 1024 * 1024


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


def parse_request(raw_request: bytes, peer: PeerCred) -> Request:
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


def check_permission(request: Request) -> None:
    if request.verb in MUTATING_VERBS and request.peer.uid != 0:
        raise IpcError(
            f"permission denied: {request.verb!r} changes the system and needs root (uid 0); "
            f"you are uid {request.peer.uid}"
        )


def internal_error(exc: BaseException) -> str:
    return f"internal error: {type(exc).__name__}: {exc}"


def encode_line(message: Mapping[str, Any]) -> bytes:
    # allow_nan=False: NaN is not JSON and would break strict parsers on the other end.
    return json.dumps(message, allow_nan=False).encode() + b"\n"
