"""The door for /etc/login.defs, /etc/issue and /etc/issue.net: vps-agent.service's ProtectSystem=strict
keeps /etc itself read-only, so an atomic write there fails with EROFS and goes through `vps-agent
write-file`, run by systemd-run outside the sandbox; the helper writes only those three files. (The booted
VPS test, tests/e2e/test_strict_profile_on_vps.py, runs it under the real unit.)"""

from __future__ import annotations

import base64
import errno
import io
import tempfile
from pathlib import Path
from typing import Any

import pytest

from agent.system import fs, outside


def test_a_read_only_etc_sends_the_write_through_the_helper_outside_the_sandbox(
    tmp_path: Path, commands: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = Path("/etc/login.defs")

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(outside, "available", lambda path: path == target)
    commands.expect(["systemd-run"])
    fs.atomic_write(target, b"UMASK\t027\n", mode=0o644, owner=(0, 0))
    [argv] = commands.calls
    assert argv[:2] == ["systemd-run", "--wait"] and argv[argv.index("--") + 1 :] == [
        "/usr/bin/vps-agent", "write-file", "--mode", "644", "--owner", "0:0", "/etc/login.defs",
    ]  # fmt: skip
    assert base64.b64decode(commands.inputs[0]) == b"UMASK\t027\n"


def test_a_read_only_directory_elsewhere_is_still_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OSError) as raised:
        fs.atomic_write(tmp_path / "x.conf", b"x\n")  # not one of the door's files
    assert raised.value.errno == errno.EROFS


def test_the_helper_fails_loudly_when_systemd_run_does(commands: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    commands.expect(["systemd-run"], returncode=1, stderr="Failed to start transient service unit")
    with pytest.raises(outside.OutsideWriteError, match="/etc/issue: vps-agent write-file .*Failed to start"):
        outside.write(Path("/etc/issue"), b"x\n", 0o644, (0, 0))


def test_the_helper_writes_only_its_three_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(base64.b64encode(b"x\n").decode()))
    assert outside.write_file_main("/etc/shadow", "644", "0:0") == 2
    assert "/etc/shadow: not a file this helper writes" in capsys.readouterr().err
    target = tmp_path / "issue.net"
    monkeypatch.setattr(outside, "OUTSIDE_SANDBOX", frozenset({str(target)}))
    monkeypatch.setattr("sys.stdin", io.StringIO(base64.b64encode(b"Authorised access only.\n").decode()))
    assert (
        outside.write_file_main(str(target), "644", f"{target.parent.stat().st_uid}:{target.parent.stat().st_gid}") == 0
    )
    assert target.read_bytes() == b"Authorised access only.\n" and target.stat().st_mode & 0o777 == 0o644
    monkeypatch.setattr("sys.stdin", io.StringIO("not base64!"))
    assert outside.write_file_main(str(target), "644", "0:0") == 1
    assert target.read_bytes() == b"Authorised access only.\n"  # nothing half-written
