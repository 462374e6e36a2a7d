"""Is the package manager at work? The guards ask before they converge, so they never fight dpkg.

dpkg and its frontends (apt-get, apt, unattended-upgrades, aptitude) take POSIX record locks (fcntl) on
/var/lib/dpkg/lock-frontend and /var/lib/dpkg/lock for as long as they change the system. F_GETLK asks
the kernel who holds them without taking them: an admin's `apt install` that starts at the same
moment is never refused because the agent was looking.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass

from agent.paths import SystemRoot
from agent.system.run import run

LOCKS = ("/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock")
UPDATES = "/var/lib/dpkg/updates"
# struct flock on Linux (x86_64, aarch64, ...): short l_type, short l_whence, off_t l_start, off_t
# l_len, pid_t l_pid, padded to 32 bytes
_FLOCK = "hhqqi4x"


@dataclass(frozen=True)
class Holder:
    """Who holds a dpkg lock: pid 0 when the holder is in another PID namespace."""

    lock: str
    pid: int
    command: str

    def describe(self) -> str:
        who = f"{self.command} (pid {self.pid})" if self.pid > 0 else "another process"
        return f"{who} holds {self.lock}"


def holder(root: SystemRoot) -> Holder | None:
    """The holder of the first dpkg lock that is taken, or None when dpkg is idle."""
    for lock in LOCKS:
        pid = _lock_holder(str(root.path(lock)))
        if pid is not None:
            return Holder(lock, pid, _command(pid) if pid > 0 else "")
    return None


def interrupted(root: SystemRoot) -> bool:
    """dpkg was interrupted (apt would refuse: "you must manually run 'dpkg --configure -a'")."""
    try:
        return any(root.path(UPDATES).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return False


def needs_repair(root: SystemRoot) -> bool:
    """An interrupted dpkg that nobody is finishing: files in updates/ and the locks free. While
    another dpkg runs, its half-written updates/ are its own work in progress, not an interruption."""
    return interrupted(root) and holder(root) is None


def _lock_holder(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None  # no lock file: no dpkg has ever run here (a fake root)
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        kind, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if kind == fcntl.F_UNLCK else max(pid, 0)


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return ""
    words = [a.decode("utf-8", "replace") for a in argv[:3] if a]
    return " ".join([os.path.basename(words[0]), *words[1:]]) if words else ""


def installed_packages() -> dict[str, str] | None:
    """package -> version of every installed package (dpkg's own database), None if unreadable."""
    result = run(["dpkg-query", "-W", "-f", "${binary:Package}\\t${Version}\\t${db:Status-Abbrev}\\n"], timeout=60)
    if not result.ok:
        return None
    packages = {}
    for line in result.stdout.splitlines():
        name, _, rest = line.partition("\t")
        version, _, status = rest.partition("\t")
        if status.strip()[1:2] == "i":  # ii, hi: installed (held or not)
            packages[name] = version
    return packages
