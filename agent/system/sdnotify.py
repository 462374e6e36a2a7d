"""A pure-Python sd_notify(3): tells systemd we are ready, reloading, stopping or still alive.

Pure Python so the agent does not need python3-systemd (optional on Debian) for Type=notify units.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    """Sends state datagrams to the socket systemd names in NOTIFY_SOCKET; a silent no-op without it."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._socket_name = env.get("NOTIFY_SOCKET", "")
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self.enabled: bool = bool(self._socket_name)

    @property
    def _address(self) -> str:
        # '@' means Linux's abstract namespace, spelled with a leading NUL byte on the wire.
        if self._socket_name.startswith("@"):
            return "\0" + self._socket_name[1:]
        return self._socket_name

    def send(self, **fields: str) -> bool:
        """Send KEY=value lines in one datagram; False when disabled or when systemd cannot be reached."""
        if not self.enabled or not fields:
            return False
        datagram = "".join(f"{key}={value}\n" for key, value in fields.items()).encode()
        try:
            # A fresh socket per message: thread-safe, and nothing to leak or reconnect after systemd restarts.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(datagram, self._address)
        except (OSError, ValueError):
            # A missing notify socket must never take the daemon down; systemd will see the timeout itself.
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=_one_line(status))

    def status(self, text: str) -> bool:
        return self.send(STATUS=_one_line(text))

    def reloading(self) -> bool:
        # Type=notify-reload needs MONOTONIC_USEC to tell this reload apart from an earlier one.
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING="1", MONOTONIC_USEC=str(monotonic_usec))

    def stopping(self) -> bool:
        return self.send(STOPPING="1")

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec, as sd_watchdog_enabled(3) advises), or None."""
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                watched_pid = int(self._watchdog_pid)
            except ValueError:
                return None
            # The watchdog belongs to another process of the unit (e.g. we were spawned by the main pid).
            if watched_pid != os.getpid():
                return None
        return usec / 2 / 1e6


def _one_line(text: str) -> str:
    # A newline inside a value would start a new KEY=value assignment in the datagram.
    return " ".join(text.splitlines()) if text else ""
