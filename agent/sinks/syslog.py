"""Remote syslog: each event as one RFC 5424 message with structured data, over UDP, TCP or TCP+TLS
(octet-counted framing, RFC 6587/5425), from a thread of its own.

The emitting thread (often a heal) only appends to a bounded buffer and returns: a dead, slow or
stopped collector can never slow a heal. When the buffer is full the oldest message is dropped and
counted; after an outage the buffer is delivered in order.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.config import SYSLOG_FACILITIES, SyslogConfig
from agent.sinks import catalog

APP_NAME = "vps-agent"
# SD-IDs of our own need an IANA enterprise number; 32473 is the one RFC 5612 reserves for documentation
# and examples, used until the project registers its own. Collectors match on the whole "vps-agent@32473".
SD_ID = "vps-agent@32473"
MAX_MESSAGE_BYTES = 8192  # rsyslog's default maxMessageSize; RFC 5426 asks receivers for at least 2048
MAX_PARAM_CHARS = 1024
# bulky or header fields: the header carries @timestamp, host.name and event.action already; a diff is
# many lines long (the events file and the journal keep it whole)
_NOT_PARAMS = frozenset({"message", "diff", "@timestamp"})
CONNECT_TIMEOUT = 5.0
SEND_TIMEOUT = 5.0
RETRY_MIN, RETRY_MAX = 0.5, 30.0


def _printusascii(text: str, limit: int) -> str:
    cleaned = "".join(c if 33 <= ord(c) <= 126 else "_" for c in text)[:limit]
    return cleaned or "-"


def _sd_name(name: str) -> str | None:
    if len(name) > 32 or any(c in '= ]"' or not 33 <= ord(c) <= 126 for c in name):
        return None
    return name


def _sd_value(value: Any) -> str:
    text = catalog.as_text(value)
    if len(text) > MAX_PARAM_CHARS:
        text = text[: MAX_PARAM_CHARS - 1] + "…"
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def format_rfc5424(event: dict[str, Any], facility: str = "daemon", pid: int | None = None) -> bytes:
    """<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [vps-agent@32473 event.action="..." ...] MSG"""
    priority = SYSLOG_FACILITIES[facility] * 8 + catalog.severity(event)
    action = str(event.get("event", {}).get("action", "-"))
    params = []
    for dotted, value in catalog.flatten(event):
        name = _sd_name(dotted)
        if value is None or name is None or dotted in _NOT_PARAMS:
            continue
        params.append(f'{name}="{_sd_value(value)}"')
    params.append(f'message_id="{catalog.lookup(action).message_id}"')
    header = " ".join(
        (
            f"<{priority}>1",
            _printusascii(str(event.get("@timestamp", "-")), 64),
            _printusascii(str(event.get("host", {}).get("name", "-")), 255),
            APP_NAME,
            str(pid if pid is not None else os.getpid()),
            _printusascii(action, 32),
            f"[{SD_ID} {' '.join(params)}]",
        )
    ).encode()
    message = str(event.get("message", "")).encode("utf-8", "replace")
    room = MAX_MESSAGE_BYTES - len(header) - 1
    if room <= 0:
        return header[:MAX_MESSAGE_BYTES]
    return header + b" " + message[:room].decode("utf-8", "ignore").encode()


class SyslogForwarder:
    """deliver() never blocks; a thread of its own connects, sends, reconnects with back-off."""

    def __init__(
        self, config: SyslogConfig, on_outage: Callable[[str], None] | None = None, ca_file: str | None = None
    ) -> None:
        self.config = config
        self._ca_file = ca_file if ca_file is not None else config.ca_file  # as seen from the agent (--root)
        self._on_outage = on_outage  # called once when an outage begins, from the forwarder's thread
        self._buffer: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._sock: socket.socket | None = None
        self.sent = 0
        self.dropped = 0
        self.connected = False
        self.error: str | None = None
        self.error_since: float | None = None
        self._thread = threading.Thread(target=self._loop, name="syslog-forwarder", daemon=True)
        self._thread.start()

    # the emitting side ----------------------------------------------------------------------------

    def deliver(self, event: dict[str, Any]) -> None:
        message = format_rfc5424(event, self.config.facility)
        with self._cond:
            if len(self._buffer) >= self.config.buffer:
                self._buffer.popleft()
                self.dropped += 1
            self._buffer.append(message)
            self._cond.notify()

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "target": self.config.target,
                "tls": self.config.tls,
                "connected": self.connected,
                "sent": self.sent,
                "dropped": self.dropped,
                "buffered": len(self._buffer),
                "buffer": self.config.buffer,
                "error": self.error,
                "error_since": self.error_since,
            }

    def close(self, flush_timeout: float = 2.0) -> None:
        """Stop; what is still buffered gets flush_timeout seconds to go out (agent-stopping among it)."""
        deadline = time.monotonic() + flush_timeout
        with self._cond:
            while self._buffer and self.connected and time.monotonic() < deadline:
                self._cond.wait(0.05)
            self._stop = True
            self._cond.notify_all()
        self._thread.join(max(0.1, deadline - time.monotonic()) + SEND_TIMEOUT)
        self._disconnect()

    # the sending side -----------------------------------------------------------------------------

    def _loop(self) -> None:
        retry = RETRY_MIN
        while True:
            with self._cond:
                while not self._buffer and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                message = self._buffer[0]
            try:
                if self._sock is None or self._peer_went_away():
                    self._disconnect()
                    self._connect()
                self._send(message)
            except (OSError, ssl.SSLError) as exc:
                self._disconnect()
                self._failed(exc)
                with self._cond:
                    self._cond.wait_for(lambda: self._stop, timeout=retry)
                retry = min(retry * 2, RETRY_MAX)
                continue
            retry = RETRY_MIN
            with self._cond:
                # only now: a message whose send failed is sent again in full on the next connection
                if self._buffer and self._buffer[0] is message:
                    self._buffer.popleft()
                self.sent += 1
                self.error = None
                self.error_since = None
                self._cond.notify_all()

    def _connect(self) -> None:
        config = self.config
        kind = socket.SOCK_DGRAM if config.protocol == "udp" else socket.SOCK_STREAM
        last: OSError | None = None
        for family, _, proto, _, address in socket.getaddrinfo(config.host, config.port, type=kind):
            sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
            sock.settimeout(CONNECT_TIMEOUT)
            try:
                sock.connect(address)
                if config.tls:
                    context = ssl.create_default_context(cafile=self._ca_file)
                    # Python 3.13 (Debian 13) turns on OpenSSL's X509_STRICT by default, which refuses a server
                    # certificate without an Authority Key Identifier, as `openssl x509 -req` and many rsyslog
                    # guides make them; 3.11 (Debian 12) takes it. The chain and the host name are checked on both.
                    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
                    sock = context.wrap_socket(sock, server_hostname=config.host)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            sock.settimeout(SEND_TIMEOUT)
            self._sock = sock
            with self._cond:
                self.connected = True
            return
        raise last or OSError(errno.EHOSTUNREACH, f"no address for {config.host}")

    def _send(self, message: bytes) -> None:
        assert self._sock is not None
        if self.config.protocol == "udp":
            self._sock.send(message)
        else:
            self._sock.sendall(b"%d %b" % (len(message), message))

    def _peer_went_away(self) -> bool:
        """A syslog collector never talks back: a readable stream socket means it closed (or reset) it."""
        if self.config.protocol == "udp" or self._sock is None:
            return False
        readable, _, _ = select.select([self._sock], [], [], 0)
        return bool(readable)

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        with self._cond:
            self.connected = False
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _failed(self, exc: BaseException) -> None:
        text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        with self._cond:
            starts = self.error_since is None
            if starts:
                self.error_since = time.time()
            self.error = f"{self.config.target}: {text}"
        if starts and self._on_outage is not None:
            self._on_outage(self.error)
