"""Is dpkg at work? Real fcntl locks, held by a real second process, the way apt and dpkg hold them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.paths import SystemRoot
from agent.system import dpkg

HOLD = """
import fcntl, sys, time
handle = open(sys.argv[1], "w")
fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
sys.stdin.read()
"""


@contextmanager
def held(path: Path) -> Iterator[subprocess.Popen[str]]:
    """A second process holds a POSIX write lock on path until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.communicate("", timeout=10)


def _dpkg_dir(tmp_path: Path, *pending: str) -> Path:
    lib = tmp_path / "var/lib/dpkg"
    (lib / "updates").mkdir(parents=True)
    for name in ("lock", "lock-frontend"):
        (lib / name).write_text("")
    for name in pending:
        (lib / "updates" / name).write_text("")
    return lib


def test_an_idle_dpkg_has_no_holder(tmp_path: Path) -> None:
    _dpkg_dir(tmp_path)
    assert dpkg.holder(SystemRoot.at(tmp_path)) is None


def test_no_dpkg_at_all_is_idle(tmp_path: Path) -> None:
    assert dpkg.holder(SystemRoot.at(tmp_path)) is None
    assert not dpkg.interrupted(SystemRoot.at(tmp_path))


def test_a_frontend_lock_names_its_holder(tmp_path: Path) -> None:
    lib = _dpkg_dir(tmp_path)
    with held(lib / "lock-frontend") as proc:
        holder = dpkg.holder(SystemRoot.at(tmp_path))
        assert holder is not None and holder.pid == proc.pid and holder.lock == "/var/lib/dpkg/lock-frontend"
        assert "python" in holder.command and f"pid {proc.pid}" in holder.describe()
    assert dpkg.holder(SystemRoot.at(tmp_path)) is None  # released when the holder ends


def test_looking_never_takes_the_lock(tmp_path: Path) -> None:
    lib = _dpkg_dir(tmp_path)
    root = SystemRoot.at(tmp_path)
    assert dpkg.holder(root) is None
    # had the agent's look taken the lock, this non-blocking lock would fail
    with held(lib / "lock"):
        assert dpkg.holder(root) is not None


def test_pending_updates_need_repair_only_while_nobody_holds_the_lock(tmp_path: Path) -> None:
    lib = _dpkg_dir(tmp_path, "0001")
    root = SystemRoot.at(tmp_path)
    assert dpkg.interrupted(root) and dpkg.needs_repair(root)
    with held(lib / "lock"):
        # a running dpkg's own work in progress: `dpkg --configure -a` would only fight it
        assert dpkg.interrupted(root) and not dpkg.needs_repair(root)
