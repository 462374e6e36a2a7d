"""Watches on parent directories: rename-over saves are seen, own echoes are not, memory stays bounded."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from agent.controls.base import WatchSpec
from agent.engine.watch import DirectoryWatcher
from agent.system import fs


def watcher_on(directory: Path, names: frozenset[str] | None = None) -> tuple[DirectoryWatcher, list[str]]:
    hits: list[str] = []
    watcher = DirectoryWatcher(fs.EchoFilter())
    watcher.set_watches("demo", [WatchSpec(directory, names)], hits.append)
    watcher.start()
    return watcher, hits


def settle(hits: list[str], count: int = 1, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(hits) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)


def test_a_rename_over_save_is_seen_and_only_named_files_count(tmp_path: Path) -> None:
    watcher, hits = watcher_on(tmp_path, frozenset({"passwd"}))
    try:
        (tmp_path / "unrelated").write_text("x")
        (tmp_path / ".passwd.new").write_text("alice:x:1000\n")
        os.rename(tmp_path / ".passwd.new", tmp_path / "passwd")
        settle(hits)
        assert hits and all(h.endswith("/passwd") for h in hits)
    finally:
        watcher.stop()


def test_the_agents_own_atomic_write_is_not_a_trigger(tmp_path: Path) -> None:
    echo = fs.EchoFilter()
    hits: list[str] = []
    watcher = DirectoryWatcher(echo)
    watcher.set_watches("demo", [WatchSpec(tmp_path)], hits.append)
    watcher.start()
    try:
        fs.atomic_write(tmp_path / "dropin.conf", b"Port 2222\n", echo=echo)
        time.sleep(0.3)
        assert hits == []
        (tmp_path / "dropin.conf").write_text("Port 22\n")
        settle(hits)
        assert hits
    finally:
        watcher.stop()


def test_reading_a_watched_file_is_no_trigger_whatever_the_watchdog_version(tmp_path: Path) -> None:
    """watchdog 5+ (Debian 13 ships 6.0) reports opens and closes without a write; `sshd -T` and the agent's own
    observe read every watched file, so those must never count as a change, or each converge causes the next."""
    config = tmp_path / "sshd_config"
    config.write_text("Port 22\n")
    watcher, hits = watcher_on(tmp_path)
    try:
        for _ in range(20):
            config.read_bytes()
            os.close(os.open(config, os.O_RDONLY))
        os.listdir(tmp_path)
        time.sleep(0.3)
        assert hits == []
        os.chmod(config, 0o600)  # metadata counts: a mode change can open a way in
        settle(hits)
        assert hits
        hits.clear()
        with config.open("a") as handle:  # and content, of course
            handle.write("PermitRootLogin yes\n")
        settle(hits)
        assert hits and all(h.endswith("/sshd_config") for h in hits)
    finally:
        watcher.stop()


def test_a_missing_directory_is_watched_through_its_parent(tmp_path: Path) -> None:
    watcher, hits = watcher_on(tmp_path / "sshd_config.d")
    try:
        assert watcher.watched() == [str(tmp_path)]
        (tmp_path / "sshd_config.d").mkdir()
        settle(hits)
        assert hits
    finally:
        watcher.stop()


def test_move_records_do_not_grow_without_bound(tmp_path: Path) -> None:
    watcher, hits = watcher_on(tmp_path)
    try:
        for n in range(200):
            (tmp_path / f".f{n}").write_text("x")
            os.rename(tmp_path / f".f{n}", tmp_path / "f")
        settle(hits, 200)
        records = [getattr(e._inotify._inotify, "_moved_from_events", {}) for e in watcher._observer.emitters]
        assert sum(len(r) for r in records) > 0  # watchdog 2.2.1 keeps every rename (its issue #1041)
        watcher.forget_move_records()
        assert sum(len(r) for r in records) == 0
    finally:
        watcher.stop()


def test_a_watched_directory_replaced_while_its_events_are_dispatched_does_not_deadlock(tmp_path: Path) -> None:
    # watchdog calls dispatch() holding its observer lock; re-declaring the watches unschedules the old
    # one (the directory was swapped: a user's ~/.ssh moved away and back) and needs that lock too
    ssh = tmp_path / "home/.ssh"
    ssh.mkdir(parents=True)
    watcher, hits = watcher_on(ssh)
    try:
        os.rename(ssh, tmp_path / "home/.ssh.real")
        ssh.mkdir()  # a new inode: set_watches will unschedule the old watch
        dispatching = threading.Event()

        def a_dispatch_in_progress() -> None:
            with watcher._observer._lock:
                dispatching.set()
                time.sleep(0.3)
                watcher.dispatch([str(ssh / "authorized_keys")])

        dispatcher = threading.Thread(target=a_dispatch_in_progress, daemon=True)
        dispatcher.start()
        dispatching.wait(5)
        redeclare = threading.Thread(
            target=watcher.set_watches, args=("demo", [WatchSpec(ssh)], hits.append), daemon=True
        )
        redeclare.start()
        dispatcher.join(5)
        redeclare.join(5)
        assert not dispatcher.is_alive() and not redeclare.is_alive(), "deadlocked"
        assert watcher.watched() == [str(ssh)]
        (ssh / "authorized_keys").write_text("key\n")
        settle(hits, 2)
        assert any(h.endswith("/authorized_keys") for h in hits)  # the new directory is watched
    finally:
        watcher.stop()
