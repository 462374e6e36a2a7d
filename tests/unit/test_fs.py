"""The file door: never follows a planted symlink, never blocks on a FIFO, never leaves half a file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.system import backups, fs


def test_atomic_write_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "shadow"
    victim.write_text("root:secret\n")
    link = tmp_path / "dropin.conf"
    os.symlink(victim, link)
    fs.atomic_write(link, b"Port 2222\n", mode=0o644)
    assert victim.read_text() == "root:secret\n"
    assert not link.is_symlink() and link.read_text() == "Port 2222\n"


def test_read_refuses_symlinks_fifos_and_oversized_files(tmp_path: Path) -> None:
    os.symlink("/etc/passwd", tmp_path / "link")
    with pytest.raises(fs.UnsafeFile, match="symlink"):
        fs.read_regular(tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(fs.UnsafeFile, match="not a regular file"):
        fs.read_regular(tmp_path / "fifo")
    (tmp_path / "big").write_bytes(b"x" * 2048)
    with pytest.raises(fs.UnsafeFile, match="over the 1024-byte limit"):
        fs.read_regular(tmp_path / "big", limit=1024)
    assert fs.read_regular(tmp_path / "missing") is None


def test_binary_garbage_is_reported_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"Port 22\nPermitRootLogin \xff\xfe\n")
    with pytest.raises(fs.UnsafeFile, match="line 2: expected UTF-8"):
        fs.read_text(tmp_path / "f")


def test_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "sshd_config"
    target.write_text("old\n")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs.os, "replace", broken_replace)
    with pytest.raises(OSError):
        fs.atomic_write(target, b"new\n")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["sshd_config"]


def test_backup_and_restore_round_trip_files_symlinks_and_absence(tmp_path: Path) -> None:
    regular, link, absent = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    regular.write_text("A\n")
    os.chmod(regular, 0o600)
    os.symlink("/nowhere", link)
    store = backups.BackupStore(tmp_path / "backups", keep=5)
    backup = store.begin("ssh", "tx1")
    for path in (regular, link, absent):
        backup.save(path)
    regular.write_text("changed\n")
    link.unlink()
    link.write_text("now a file\n")
    absent.write_text("created\n")
    backup.restore()
    assert regular.read_text() == "A\n" and os.stat(regular).st_mode & 0o777 == 0o600
    assert os.readlink(link) == "/nowhere"
    assert not absent.exists()


def test_echo_filter_recognises_only_the_agents_own_write(tmp_path: Path) -> None:
    echo = fs.EchoFilter()
    target = tmp_path / "f"
    fs.atomic_write(target, b"ours\n", echo=echo)
    assert echo.is_echo(str(target))
    target.write_text("someone else's\n")
    assert not echo.is_echo(str(target))
    assert echo.is_echo(str(tmp_path / f".f{fs.TMP_MARKER}abc"))


# by directory fd: where someone other than root owns a directory on the way ----------------------------


def test_open_directory_refuses_a_symlink_another_user_could_have_planted(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 4242, 4242)
    os.symlink("/etc", home / ".ssh")
    with pytest.raises(fs.UnsafeFile, match=r"is a symlink to '/etc' and .* is owned by uid 4242; not following"):
        fs.open_directory(home / ".ssh", fs.Owners(frozenset({4242})))


def test_open_directory_follows_roots_own_symlinks_in_roots_own_directories(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "link")
    with fs.opened_directory(tmp_path / "link") as fd:
        assert os.fstat(fd).st_ino == os.stat(tmp_path / "real").st_ino


def test_open_directory_refuses_owners_not_trusted_and_writable_directories(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 4242, 4242)
    with pytest.raises(fs.UnsafeFile, match="is owned by uid 4242"):
        fs.open_directory(theirs)
    with fs.opened_directory(theirs, fs.Owners(frozenset({4242}))):
        pass  # its owner trusted for this path (the admin for its home): opened
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(fs.UnsafeFile, match=r"writable by others \(mode 0777\)"):
        fs.open_directory(shared)
    os.chmod(shared, 0o1777)  # root's and sticky, like /tmp: others cannot replace what is in it
    with fs.opened_directory(shared):
        pass
    os.chmod(shared, 0o775)
    os.chown(shared, 0, 4242)
    with pytest.raises(fs.UnsafeFile, match=r"writable by group 4242 \(mode 0775\)"):
        fs.open_directory(shared)
    with fs.opened_directory(shared, fs.Owners(gids=frozenset({4242}))):
        pass
    with pytest.raises(FileNotFoundError):
        fs.open_directory(tmp_path / "missing")


def test_atomic_write_at_replaces_a_planted_symlink_and_leaves_no_temporary(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("root's\n")
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    os.symlink(victim, metrics / "vps_agent.prom")
    with fs.opened_directory(metrics) as fd:
        fs.atomic_write_at(fd, "vps_agent.prom", b"x 1\n", mode=0o644)
        assert fs.read_regular_at(fd, "missing", metrics / "missing") is None
        data, info = fs.read_regular_at(fd, "vps_agent.prom", metrics / "vps_agent.prom") or (b"", None)
        assert data == b"x 1\n" and info is not None and oct(info.st_mode & 0o777) == "0o644"
        fs.remove_at(fd, "vps_agent.prom")
        fs.remove_at(fd, "vps_agent.prom")  # gone already: fine
    assert victim.read_text() == "root's\n" and os.listdir(metrics) == []


def test_a_full_filesystem_is_named_with_its_mount_point_and_room(tmp_path: Path) -> None:
    import errno

    full = OSError(errno.ENOSPC, "No space left on device")
    problem = fs.resource_problem(full, tmp_path / "backups")
    assert problem is not None and problem.startswith(
        f"{tmp_path / 'backups'}: No space left on device (the filesystem"
    )
    assert "is full" in problem and "KiB free" in problem
    read_only = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x"))
    assert "is read-only)" in (fs.resource_problem(read_only) or "")
    assert fs.resource_problem(OSError(errno.EACCES, "Permission denied")) is None
    assert fs.mount_point(Path("/proc/self")) == Path("/proc")
