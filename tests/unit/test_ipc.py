"""The control socket protocol, exercised over real Unix sockets in tmp_path."""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
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
