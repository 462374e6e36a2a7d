"""The sd_notify datagrams the daemon sends, received on real AF_UNIX sockets."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.system.sdnotify import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, and the NOTIFY_SOCKET value that names it."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2.0)
        yield sock, str(path)


def received(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def test_ready_sends_ready_and_status(notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    assert Notifier({"NOTIFY_SOCKET": name}).ready("guarding 5 controls") is True
    assert received(sock) == b"READY=1\nSTATUS=guarding 5 controls\n"


def test_status_folds_newlines_into_one_line(notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    assert Notifier({"NOTIFY_SOCKET": name}).status("sshd: drift\nfirewall: ok") is True
    assert received(sock) == b"STATUS=sshd: drift firewall: ok\n"


def test_reloading_carries_the_current_monotonic_time(notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier({"NOTIFY_SOCKET": name}).reloading() is True
    after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = received(sock).decode().splitlines()
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before_usec <= int(value) <= after_usec
    assert len(lines) == 2


def test_stopping_and_watchdog_datagrams(notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": name})
    assert notifier.stopping() is True
    assert received(sock) == b"STOPPING=1\n"
    assert notifier.watchdog() is True
    assert received(sock) == b"WATCHDOG=1\n"


def test_send_joins_arbitrary_fields_in_order(notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    assert Notifier({"NOTIFY_SOCKET": name}).send(STATUS="x", ERRNO="5") is True
    assert received(sock) == b"STATUS=x\nERRNO=5\n"


def test_at_prefix_addresses_the_abstract_namespace() -> None:
    abstract_name = f"vps-agent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + abstract_name)
        sock.settimeout(2.0)
        assert Notifier({"NOTIFY_SOCKET": "@" + abstract_name}).ready("up") is True
        assert received(sock) == b"READY=1\nSTATUS=up\n"


def test_disabled_without_notify_socket_sends_nothing() -> None:
    notifier = Notifier({})
    assert notifier.enabled is False
    assert notifier.ready("up") is False
    assert notifier.watchdog() is False


def test_enabled_only_when_notify_socket_is_set(notify_socket: tuple[socket.socket, str]) -> None:
    _, name = notify_socket
    assert Notifier({"NOTIFY_SOCKET": name}).enabled is True
    assert Notifier({"NOTIFY_SOCKET": ""}).enabled is False


def test_defaults_to_the_process_environment(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, name = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    assert Notifier().status("from os.environ") is True
    assert received(sock) == b"STATUS=from os.environ\n"


def test_send_to_a_vanished_socket_returns_false_instead_of_raising(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled is True
    assert notifier.ready("up") is False


def test_send_to_a_socket_nobody_listens_on_returns_false(tmp_path: Path) -> None:
    path = tmp_path / "closed.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    # The file stays behind but nothing receives on it: sendto gets ECONNREFUSED.
    assert Notifier({"NOTIFY_SOCKET": str(path)}).watchdog() is False


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid(
    environ: dict[str, str], expected: float | None
) -> None:
    assert Notifier(environ).watchdog_interval() == expected
