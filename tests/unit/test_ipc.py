"""The control socket protocol, exercised over real Unix sockets in tmp_path."""

from __future__ import annotations

import errno
import grp
import itertools
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.ipc import (
    MAX_REQUEST_BYTES,
    DaemonUnreachable,
    IpcClient,
    IpcError,
    IpcServer,
    PeerCred,
    Request,
)
from agent.ipc import server as serving


class RecordingHandler:
    """A handler with a few verbs, remembering every request it was given."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.stream_closed = threading.Event()

    def __call__(self, request: Request) -> Any:
        self.requests.append(request)
        if request.verb == "status":
            return {"compliant": True, "peer": {"uid": request.peer.uid, "pid": request.peer.pid}}
        if request.verb == "echo":
            return dict(request.args)
        if request.verb == "pause":
            return {"paused": True}
        if request.verb == "events":
            return self._endless_events()
        if request.verb == "few-events":
            return iter([{"n": 1}, {"n": 2}])
        if request.verb == "explode":
            raise RuntimeError("disk on fire")
        if request.verb == "refuse":
            raise IpcError("control 'sshd' is blocked")
        if request.verb == "unserialisable":
            return {"when": object()}
        if request.verb == "stream-then-fail":
            return self._failing_events()
        if request.verb == "quiet-events":
            return self._quiet_events()
        raise IpcError(f"unknown verb {request.verb!r}")

    def _endless_events(self) -> Iterator[dict[str, Any]]:
        try:
            n = 0
            while True:
                n += 1
                yield {"event.action": "drift-detected", "n": n}
                time.sleep(0.001)
        finally:
            self.stream_closed.set()

    def _quiet_events(self) -> Iterator[dict[str, Any] | None]:
        """`events -f` on a quiet system: no event, only the ticks that say nothing is new."""
        try:
            while True:
                yield None
                time.sleep(0.01)
        finally:
            self.stream_closed.set()

    def _failing_events(self) -> Iterator[dict[str, Any]]:
        yield {"n": 1}
        raise ValueError("journal rotated under us")


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "agent.sock"


@pytest.fixture
def server(socket_path: Path, handler: RecordingHandler) -> Iterator[IpcServer]:
    ipc_server = IpcServer(socket_path, handler)
    ipc_server.start()
    yield ipc_server
    ipc_server.stop()


def raw_exchange(path: Path, payload: bytes, *, half_close: bool = False) -> list[dict[str, Any]]:
    """Send bytes as a hand-written client would and return every answer line the server sent."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(str(path))
        try:
            sock.sendall(payload)
        except BrokenPipeError:
            pass  # the server may answer and hang up before reading an oversized request to the end
        if half_close:
            sock.shutdown(socket.SHUT_WR)  # what `printf ... | socat - UNIX-CONNECT:...` does at EOF
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return [json.loads(line) for line in received.splitlines()]


def leave_stale_socket(path: Path) -> None:
    """A socket file whose daemon died: the file stays, nobody listens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


def test_round_trip_returns_the_handler_result(server: IpcServer, handler: RecordingHandler) -> None:
    result = IpcClient(server.path).call("echo", control="sshd", dry_run=True)
    assert result == {"control": "sshd", "dry_run": True}
    assert handler.requests[0].verb == "echo"
    assert handler.requests[0].peer == PeerCred(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())


def test_wire_format_is_one_json_line_each_way(server: IpcServer) -> None:
    answers = raw_exchange(server.path, b'{"verb": "echo", "args": {"a": 1}}\n')
    assert answers == [{"ok": True, "result": {"a": 1}}]


def test_args_default_to_empty_and_request_may_end_at_eof(server: IpcServer, handler: RecordingHandler) -> None:
    answers = raw_exchange(server.path, b'{"verb": "echo"}', half_close=True)
    assert answers == [{"ok": True, "result": {}}]


def test_socket_gets_the_requested_mode_and_a_0755_parent(server: IpcServer) -> None:
    assert stat.S_ISSOCK(os.lstat(server.path).st_mode)
    assert stat.S_IMODE(os.lstat(server.path).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o755


def test_stop_removes_the_socket_and_clients_then_see_daemon_unreachable(
    socket_path: Path, handler: RecordingHandler
) -> None:
    ipc_server = IpcServer(socket_path, handler)
    ipc_server.start()
    ipc_server.stop()
    assert not socket_path.exists()
    with pytest.raises(DaemonUnreachable):
        IpcClient(socket_path).call("status")


def test_handler_error_becomes_a_clean_error_answer(server: IpcServer) -> None:
    with pytest.raises(IpcError) as raised:
        IpcClient(server.path).call("refuse")
    assert not isinstance(raised.value, DaemonUnreachable)
    assert raised.value.message == "control 'sshd' is blocked"


def test_server_survives_a_handler_exception(server: IpcServer) -> None:
    client = IpcClient(server.path)
    with pytest.raises(IpcError, match=r"^internal error: RuntimeError: disk on fire$"):
        client.call("explode")
    assert client.call("status")["compliant"] is True


def test_unserialisable_result_is_an_internal_error_not_a_crash(server: IpcServer) -> None:
    client = IpcClient(server.path)
    with pytest.raises(IpcError, match=r"^internal error: TypeError: "):
        client.call("unserialisable")
    assert client.call("status")["compliant"] is True


def test_streaming_verb_yields_items_and_runs_the_generator_finally_when_client_stops_early(
    server: IpcServer, handler: RecordingHandler
) -> None:
    items = IpcClient(server.path).stream("events", follow=True)
    first_three = [next(items) for _ in range(3)]
    assert [item["n"] for item in first_three] == [1, 2, 3]
    assert not handler.stream_closed.is_set()
    items.close()  # closing the client generator hangs up the connection
    assert handler.stream_closed.wait(5.0), "the server never closed the generator after the client left"


def test_finite_stream_ends_when_the_server_closes(server: IpcServer) -> None:
    assert list(IpcClient(server.path).stream("few-events")) == [{"n": 1}, {"n": 2}]


def test_stream_that_fails_part_way_raises_after_the_items_it_sent(server: IpcServer) -> None:
    items = IpcClient(server.path).stream("stream-then-fail")
    assert next(items) == {"n": 1}
    with pytest.raises(IpcError, match=r"^internal error: ValueError: journal rotated under us$"):
        next(items)


def test_call_on_a_streaming_verb_and_stream_on_a_plain_verb_are_refused(server: IpcServer) -> None:
    client = IpcClient(server.path)
    with pytest.raises(IpcError, match="use IpcClient.stream"):
        client.call("few-events")
    with pytest.raises(IpcError, match="use IpcClient.call"):
        client.stream("status")


@pytest.mark.parametrize(
    ("payload", "error_starts_with"),
    [
        (b"this is not json\n", "bad request: not valid JSON"),
        (b"\xff\xfe\n", "bad request: not valid JSON"),
        (b'["status"]\n', "bad request: expected a JSON object, got list"),
        (b'{"args": {}}\n', 'bad request: "verb" must be a non-empty string'),
        (b'{"verb": 7}\n', 'bad request: "verb" must be a non-empty string'),
        (b'{"verb": "status", "args": [1]}\n', 'bad request: "args" must be a JSON object, got list'),
        (b"\n", "bad request: not valid JSON"),
    ],
)
def test_malformed_request_gets_a_clean_error_and_the_server_keeps_serving(
    server: IpcServer, handler: RecordingHandler, payload: bytes, error_starts_with: str
) -> None:
    answers = raw_exchange(server.path, payload)
    assert len(answers) == 1
    assert answers[0]["ok"] is False
    assert answers[0]["error"].startswith(error_starts_with)
    assert handler.requests == []
    assert IpcClient(server.path).call("status")["compliant"] is True


def test_oversized_request_is_refused_without_reaching_the_handler(
    server: IpcServer, handler: RecordingHandler
) -> None:
    oversized = b'{"verb": "echo", "args": {"blob": "' + b"x" * MAX_REQUEST_BYTES + b'"}}\n'
    answers = raw_exchange(server.path, oversized)
    assert answers == [{"ok": False, "error": f"request too large: more than {MAX_REQUEST_BYTES} bytes"}]
    assert handler.requests == []
    assert IpcClient(server.path).call("status")["compliant"] is True


def test_client_refuses_to_send_an_oversized_request(server: IpcServer, handler: RecordingHandler) -> None:
    with pytest.raises(IpcError, match="request too large"):
        IpcClient(server.path).call("echo", blob="x" * MAX_REQUEST_BYTES)
    assert handler.requests == []


def test_connection_that_sends_nothing_does_not_disturb_the_server(server: IpcServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(server.path))
    assert IpcClient(server.path).call("status")["compliant"] is True


def test_mutating_verb_is_allowed_for_root(server: IpcServer) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root: the peer must be uid 0 for a mutating verb to be allowed")
    assert IpcClient(server.path).call("pause") == {"paused": True}


def test_mutating_verb_from_a_non_root_peer_is_refused_but_read_only_verbs_work(
    tmp_path: Path, handler: RecordingHandler
) -> None:
    if os.getuid() != 0:
        pytest.skip("NOT TESTED: SO_PEERCRED permission check needs root to fork a child that drops to uid 65534")
    socket_dir = tmp_path / "run"
    socket_dir.mkdir(mode=0o755)
    # World-connectable for this test only: uid 65534 is not in group adm.
    ipc_server = IpcServer(socket_dir / "agent.sock", handler, mode=0o666)
    ipc_server.start()
    try:
        outcome = _run_as_nobody(socket_dir)
    finally:
        ipc_server.stop()
    assert outcome["pause_error"] == (
        "permission denied: 'pause' changes the system and needs root (uid 0); you are uid 65534"
    )
    assert outcome["status_result"]["compliant"] is True
    assert outcome["status_result"]["peer"]["uid"] == 65534
    assert [request.verb for request in handler.requests] == ["status"], "the handler saw the refused verb"


def _run_as_nobody(socket_dir: Path) -> dict[str, Any]:
    """Fork a child that drops to uid/gid 65534 and talks to the socket; return what it saw."""
    read_end, write_end = os.pipe()
    child_pid = os.fork()
    if child_pid == 0:
        exit_code = 1
        try:
            os.close(read_end)
            # tmp_path's ancestors are 0700, so chdir while still root and connect by a relative path.
            os.chdir(socket_dir)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            client = IpcClient(Path("agent.sock"), timeout=5.0)
            outcome: dict[str, Any] = {"uid": os.getuid()}
            try:
                client.call("pause")
                outcome["pause_error"] = None
            except IpcError as exc:
                outcome["pause_error"] = exc.message
            outcome["status_result"] = client.call("status")
            os.write(write_end, json.dumps(outcome).encode())
            exit_code = 0
        except BaseException as exc:
            os.write(write_end, json.dumps({"child_failed": repr(exc)}).encode())
        finally:
            os._exit(exit_code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as from_child:
        report = json.loads(from_child.read() or b"{}")
    _, wait_status = os.waitpid(child_pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, report
    assert report["uid"] == 65534
    return report


def test_daemon_unreachable_when_no_socket_exists(tmp_path: Path) -> None:
    missing = tmp_path / "run" / "agent.sock"
    with pytest.raises(DaemonUnreachable) as raised:
        IpcClient(missing).call("status")
    assert str(missing) in raised.value.message


def test_daemon_unreachable_when_a_stale_socket_has_no_listener(socket_path: Path) -> None:
    leave_stale_socket(socket_path)
    with pytest.raises(DaemonUnreachable) as raised:
        IpcClient(socket_path).call("status")
    assert str(socket_path) in raised.value.message


def test_daemon_unreachable_when_the_daemon_never_answers(socket_path: Path) -> None:
    socket_path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute_listener:
        mute_listener.bind(str(socket_path))
        mute_listener.listen(1)
        with pytest.raises(DaemonUnreachable, match="timed out") as raised:
            IpcClient(socket_path, timeout=0.2).call("status")
    assert str(socket_path) in raised.value.message


def test_start_replaces_a_stale_socket(socket_path: Path, handler: RecordingHandler) -> None:
    leave_stale_socket(socket_path)
    ipc_server = IpcServer(socket_path, handler)
    ipc_server.start()
    try:
        assert IpcClient(socket_path).call("status")["compliant"] is True
    finally:
        ipc_server.stop()


def test_start_refuses_to_replace_a_file_that_is_not_a_socket(socket_path: Path, handler: RecordingHandler) -> None:
    socket_path.parent.mkdir(parents=True)
    socket_path.write_text("precious\n")
    with pytest.raises(FileExistsError, match="not a socket"):
        IpcServer(socket_path, handler).start()
    assert socket_path.read_text() == "precious\n"


def test_start_refuses_to_steal_the_socket_of_a_live_server(server: IpcServer, handler: RecordingHandler) -> None:
    with pytest.raises(FileExistsError, match="already serving"):
        IpcServer(server.path, handler).start()
    assert IpcClient(server.path).call("status")["compliant"] is True


def test_stop_does_not_hang_on_a_client_that_never_sends_its_request(
    socket_path: Path, handler: RecordingHandler
) -> None:
    ipc_server = IpcServer(socket_path, handler)
    ipc_server.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle_client:
        idle_client.connect(str(socket_path))
        started = time.monotonic()
        ipc_server.stop()
        assert time.monotonic() - started < 1.0


def test_socket_is_owned_by_root_and_the_configured_group(socket_path: Path, handler: RecordingHandler) -> None:
    if os.getuid() != 0:
        pytest.skip("NOT TESTED: chown to root:group needs root")
    try:
        adm_gid = grp.getgrnam("adm").gr_gid
    except KeyError:
        pytest.skip("NOT TESTED: this system has no 'adm' group")
    ipc_server = IpcServer(socket_path, handler, group="adm")
    ipc_server.start()
    try:
        owner = os.lstat(socket_path)
        assert (owner.st_uid, owner.st_gid) == (0, adm_gid)
    finally:
        ipc_server.stop()


def test_stop_leaves_alone_a_socket_that_replaced_ours(socket_path: Path, handler: RecordingHandler) -> None:
    ipc_server = IpcServer(socket_path, handler)
    ipc_server.start()
    socket_path.unlink()
    leave_stale_socket(socket_path)  # e.g. a newer daemon instance bound the path meanwhile
    ipc_server.stop()
    assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)


# --- the caps: what a client may make the agent spend ---------------------------------------------
#
# The peer's uid comes from SO_PEERCRED, which a test cannot set without forking as other users. Here
# a client that binds its socket to the abstract name "\0uid-N-..." is taken for uid N (the server sees
# that name as the peer's address); an unbound client, as IpcClient is, for root.

_client_numbers = itertools.count(1)


def fake_peer_credentials(conn: socket.socket) -> PeerCred:
    name = conn.getpeername()
    if isinstance(name, bytes) and name.startswith(b"\0uid-"):
        return PeerCred(pid=os.getpid(), uid=int(name.split(b"-")[1]), gid=100)
    return PeerCred(pid=os.getpid(), uid=0, gid=0)


@pytest.fixture
def small_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving, "_peer_credentials", fake_peer_credentials)
    monkeypatch.setattr(serving, "MAX_CONNECTIONS_PER_UID", 3)
    monkeypatch.setattr(serving, "MAX_STREAMS_PER_UID", 2)
    monkeypatch.setattr(serving, "MAX_UNPRIVILEGED_CONNECTIONS", 5)
    monkeypatch.setattr(serving, "MAX_ROOT_CONNECTIONS", 4)
    monkeypatch.setattr(serving, "REQUEST_DEADLINE", 30.0)  # idle clients hold their connection in these tests


def connect_as(path: Path, uid: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    if uid != 0:
        sock.bind(f"\0uid-{uid}-{os.getpid()}-{next(_client_numbers)}")
    sock.connect(str(path))
    return sock


def answer_and_close(sock: socket.socket) -> list[dict[str, Any]]:
    """Every line the server sent before it closed the connection."""
    received = b""
    with sock:
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # closed with our request unread: the lines before the reset still count
    return [json.loads(line) for line in received.splitlines()]


def request_as(path: Path, uid: int, payload: bytes = b'{"verb": "status"}\n') -> list[dict[str, Any]]:
    sock = connect_as(path, uid)
    try:
        sock.sendall(payload)
    except BrokenPipeError:
        pass  # refused before it read a byte: the answer is still waiting for us
    return answer_and_close(sock)


def hold_idle(path: Path, uid: int, count: int, server: IpcServer) -> list[socket.socket]:
    """count connections of uid that send nothing, each counted in by the server before the next."""
    held = []
    for _ in range(count):
        held.append(connect_as(path, uid))
        counted = len(held)
        wait_until(lambda: server.stats()["by_uid"].get(str(uid)) == counted)  # noqa: B023 (called at once)
    return held


def follow_as(path: Path, uid: int) -> socket.socket:
    """An `events --follow` stream of uid, its first line read: the server holds it open."""
    sock = connect_as(path, uid)
    sock.sendall(b'{"verb": "events", "args": {"follow": true}}\n')
    assert sock.makefile("rb").readline() == b'{"ok": true, "stream": true}\n'
    return sock


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def test_a_uid_over_its_connection_cap_is_told_so_and_closed_while_other_uids_are_served(
    small_caps: None, server: IpcServer
) -> None:
    held = hold_idle(server.path, 1000, 3, server)
    try:
        assert request_as(server.path, 1000) == [{"ok": False, "error": "too many connections from uid 1000 (cap 3)"}]
        [served] = request_as(server.path, 1001)
        assert served["ok"] is True and served["result"]["compliant"] is True
        assert server.stats()["refused_over_cap"] == 1
    finally:
        close_all(held)
    # the slots come back when the connections end
    wait_until(lambda: server.stats()["connections"] == 0)
    assert request_as(server.path, 1000)[0]["ok"] is True


def test_all_uids_but_root_together_are_capped(small_caps: None, server: IpcServer) -> None:
    held = hold_idle(server.path, 1000, 3, server) + hold_idle(server.path, 1001, 2, server)
    try:
        assert request_as(server.path, 1002) == [
            {"ok": False, "error": "too many connections from uids other than root (cap 5); uid 1002 holds 0"}
        ]
    finally:
        close_all(held)


def test_root_is_served_while_the_others_hold_every_connection_they_may(small_caps: None, server: IpcServer) -> None:
    held = hold_idle(server.path, 1000, 3, server) + hold_idle(server.path, 1001, 2, server)
    try:
        assert request_as(server.path, 1002)[0]["ok"] is False
        # three idle root connections as well: root's fourth is still served, with vps-agentctl's client
        held += hold_idle(server.path, 0, 3, server)
        assert IpcClient(server.path).call("status")["compliant"] is True
    finally:
        close_all(held)


def test_root_has_a_cap_of_its_own_and_its_client_says_so(small_caps: None, server: IpcServer) -> None:
    held = hold_idle(server.path, 0, 4, server)
    try:
        with pytest.raises(IpcError) as raised:
            IpcClient(server.path).call("status")
        assert not isinstance(raised.value, DaemonUnreachable)
        assert raised.value.message == "too many connections from uid 0 (cap 4)"
    finally:
        close_all(held)


def test_a_uid_over_its_stream_cap_is_refused_the_stream_but_served_status(
    small_caps: None, server: IpcServer, handler: RecordingHandler
) -> None:
    streams = [follow_as(server.path, 1000), follow_as(server.path, 1000)]
    try:
        assert request_as(server.path, 1000, b'{"verb": "events", "args": {"follow": true}}\n') == [
            {"ok": False, "error": "too many event streams from uid 1000 (cap 2)"}
        ]
        assert request_as(server.path, 1000)[0]["ok"] is True
        assert follow_as(server.path, 1001)  # another uid's streams are its own
        assert server.stats()["refused_streams"] == 1
    finally:
        close_all(streams)
    wait_until(lambda: server.stats()["streams"] <= 1)
    follow_as(server.path, 1000).close()  # a closed stream gives its place back


def test_a_slow_sender_is_dropped_at_the_deadline_however_it_spaces_its_bytes(
    small_caps: None, monkeypatch: pytest.MonkeyPatch, server: IpcServer, handler: RecordingHandler
) -> None:
    monkeypatch.setattr(serving, "REQUEST_DEADLINE", 1.0)
    request = b'{"verb": "status", "args": {"pad": "' + b"x" * 100 + b'"}}\n'
    sock = connect_as(server.path, 1000)
    started = time.monotonic()
    sent = 0
    try:
        # a byte every 50 ms: each recv() on the server is quick, only the deadline can end this
        while time.monotonic() - started < 3.0:
            sock.send(request[sent : sent + 1])
            sent += 1
            time.sleep(0.05)
    except (BrokenPipeError, ConnectionResetError):
        pass
    dropped_after = time.monotonic() - started
    assert 0.9 < dropped_after < 1.5, dropped_after
    assert answer_and_close(sock) == [{"ok": False, "error": "request not received within 1s of connecting"}]
    assert handler.requests == []
    assert server.stats()["request_deadline"] == 1
    wait_until(lambda: server.stats()["connections"] == 0)


def test_a_thread_that_cannot_start_costs_that_connection_only(
    small_caps: None, monkeypatch: pytest.MonkeyPatch, server: IpcServer, caplog: pytest.LogCaptureFixture
) -> None:
    real_start = threading.Thread.start
    failures: list[str] = []

    def start_or_fail_once(thread: threading.Thread) -> None:
        if thread.name.startswith("ipc-conn-") and not failures:
            failures.append(thread.name)
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_or_fail_once)
    [refused] = request_as(server.path, 1000)
    assert refused == {
        "ok": False,
        "error": "the agent is busy (no thread for this connection: can't start new thread); try again",
    }
    assert server.stats()["thread_start_failed"] == 1
    assert server.stats()["connections"] == 0  # its place was given back
    # the accept thread lives on, and serves the next client
    assert IpcClient(server.path).call("status")["compliant"] is True
    assert [r.getMessage() for r in caplog.records if "no thread" in r.getMessage()], caplog.records


def test_emfile_on_accept_backs_off_and_is_logged_once_per_period(
    monkeypatch: pytest.MonkeyPatch, socket_path: Path, handler: RecordingHandler, caplog: pytest.LogCaptureFixture
) -> None:
    real_accept = socket.socket.accept
    failing_until = time.monotonic() + 1.5
    attempts: list[float] = []

    def accept_or_emfile(listener: socket.socket) -> tuple[socket.socket, Any]:
        if time.monotonic() < failing_until:
            attempts.append(time.monotonic())
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_accept(listener)

    monkeypatch.setattr(socket.socket, "accept", accept_or_emfile)
    ipc_server = IpcServer(socket_path, handler)
    caplog.set_level(logging.WARNING, logger="agent.ipc")
    ipc_server.start()
    try:
        # a client waiting in the backlog through the storm is served once fds are back
        assert IpcClient(socket_path, timeout=10.0).call("status")["compliant"] is True
    finally:
        ipc_server.stop()
    # 0.05 s doubling to 1 s: a handful of tries in 1.5 s, not one every few milliseconds
    assert 3 <= len(attempts) <= 7, attempts
    warnings = [r for r in caplog.records if r.name == "agent.ipc"]
    assert [r.getMessage() for r in warnings] == [f"accept() on {socket_path} failed: Too many open files; retrying"]
    assert warnings[0].exc_info is None  # no traceback
    assert ipc_server.stats()["accept_failed"] == len(attempts)


def test_the_throttled_log_reports_what_it_held_back_at_the_next_period(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [100.0]
    monkeypatch.setattr(serving.time, "monotonic", lambda: now[0])
    caplog.set_level(logging.WARNING, logger="agent.ipc")
    throttled = serving._ThrottledLog(60.0)
    for _ in range(500):
        throttled.warning("refused", "refused a connection")
    throttled.warning("accept", "accept() failed")
    now[0] += 61.0
    throttled.warning("refused", "refused a connection")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a connection",
        "accept() failed",
        "refused a connection (499 more like it in the last 60s)",
    ]


def test_a_refusal_sent_before_the_client_could_send_its_request_still_reaches_the_client(
    monkeypatch: pytest.MonkeyPatch, socket_path: Path
) -> None:
    socket_path.parent.mkdir(parents=True)
    refusing_server_done = threading.Event()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(socket_path))
        listener.listen(1)

        def refuse_at_once() -> None:
            conn, _ = listener.accept()
            conn.sendall(b'{"ok": false, "error": "too many connections from uid 0 (cap 32)"}\n')
            conn.close()
            refusing_server_done.set()

        threading.Thread(target=refuse_at_once, daemon=True).start()
        real_connect = IpcClient._connect

        def connect_then_dawdle(client: IpcClient, sock: socket.socket) -> None:
            real_connect(client, sock)
            refusing_server_done.wait(5.0)  # the server has answered and closed: our send fails with EPIPE

        monkeypatch.setattr(IpcClient, "_connect", connect_then_dawdle)
        with pytest.raises(IpcError) as raised:
            IpcClient(socket_path).call("status")
    assert not isinstance(raised.value, DaemonUnreachable)
    assert raised.value.message == "too many connections from uid 0 (cap 32)"


def test_the_client_waits_out_a_full_listen_backlog_instead_of_giving_up(
    monkeypatch: pytest.MonkeyPatch, server: IpcServer
) -> None:
    real_connect = socket.socket.connect
    refusals: list[Any] = []

    def backlog_full_twice(sock: socket.socket, address: Any) -> None:
        if len(refusals) < 2:
            refusals.append(address)
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", backlog_full_twice)
    assert IpcClient(server.path).call("status")["compliant"] is True
    assert len(refusals) == 2


def test_a_quiet_stream_whose_client_has_gone_gives_its_place_back_at_the_next_tick(
    small_caps: None, server: IpcServer, handler: RecordingHandler
) -> None:
    for _ in range(2):
        sock = connect_as(server.path, 1000)
        sock.sendall(b'{"verb": "quiet-events"}\n')
        assert sock.makefile("rb").readline() == b'{"ok": true, "stream": true}\n'
        sock.close()
    # no item was ever sent that could have failed: the ticks found both clients gone
    wait_until(lambda: server.stats()["streams"] == 0 and server.stats()["connections"] == 0, 2.0)
    assert handler.stream_closed.is_set()
    streams = [follow_as(server.path, 1000), follow_as(server.path, 1000)]  # the cap is free again
    close_all(streams)


def test_a_client_that_half_closes_after_its_request_keeps_its_stream(
    small_caps: None, server: IpcServer, handler: RecordingHandler
) -> None:
    sock = connect_as(server.path, 1000)
    sock.sendall(b'{"verb": "quiet-events"}\n')
    sock.shutdown(socket.SHUT_WR)  # what `printf ... | socat - UNIX-CONNECT:...` does at its EOF
    assert sock.makefile("rb").readline() == b'{"ok": true, "stream": true}\n'
    time.sleep(0.2)  # twenty ticks
    assert server.stats()["streams"] == 1 and not handler.stream_closed.is_set()
    sock.close()
    wait_until(lambda: server.stats()["streams"] == 0, 2.0)


def test_a_user_outside_the_sockets_group_is_told_to_join_adm_or_use_root(
    tmp_path: Path, handler: RecordingHandler
) -> None:
    if os.getuid() != 0:
        pytest.skip("NOT TESTED: needs root to fork a child that drops to uid 65534")
    socket_dir = tmp_path / "run"
    socket_dir.mkdir(mode=0o755)
    ipc_server = IpcServer(socket_dir / "agent.sock", handler)  # 0660 root:adm, as the daemon's
    ipc_server.start()
    read_end, write_end = os.pipe()
    child_pid = os.fork()
    if child_pid == 0:
        try:
            os.close(read_end)
            os.chdir(socket_dir)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            said = {}
            for verb in ("status", "pause"):
                try:
                    IpcClient(Path("agent.sock"), timeout=5.0).call(verb)
                except DaemonUnreachable as exc:
                    said[verb] = exc.message
            os.write(write_end, json.dumps(said).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as from_child:
            said = json.loads(from_child.read() or b"{}")
        os.waitpid(child_pid, 0)
    finally:
        ipc_server.stop()
    assert "run as root, or as a member of group adm (sudo adduser $USER adm" in said["status"]
    assert "'pause' changes the system and needs root (sudo)" in said["pause"]
    assert handler.requests == []
