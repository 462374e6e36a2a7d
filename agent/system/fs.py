"""The one door to files the agent guards: safe reads, atomic writes, echo fingerprints (the versioned
backups are in agent/system/backups.py)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_CONFIG_BYTES = 1024 * 1024
TMP_MARKER = ".vps-agent-tmp-"


class UnsafeFile(Exception):
    """A path the agent refuses to read or write through (a symlink, a FIFO, a device, too large)."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        self.why = why
        super().__init__(f"{path}: {why}")


def read_regular(path: Path, *, limit: int = MAX_CONFIG_BYTES, follow_symlinks: bool = False) -> bytes | None:
    """Bytes of a regular file, None when it does not exist; never blocks on a FIFO, never reads past limit."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(path, f"is a symlink to {os.readlink(path)!r}; not following it") from exc
        raise
    return _read_opened(fd, path, limit, " for config files")[0]


def _read_opened(fd: int, path: Path, limit: int, what: str = "") -> tuple[bytes, os.stat_result]:
    """Bytes and stat of the regular file open at fd (closed here), never past limit; `what` ends the
    limit's error message."""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(path, "is not a regular file")
        if info.st_size > limit:
            raise UnsafeFile(path, f"is {info.st_size} bytes, over the {limit}-byte limit{what}")
        chunks: list[bytes] = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(fd, min(65536, remaining))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise UnsafeFile(path, f"grew past the {limit}-byte limit{what}")
        return data, info
    finally:
        os.close(fd)


def read_text(path: Path, *, limit: int = MAX_CONFIG_BYTES, follow_symlinks: bool = False) -> str | None:
    data = read_regular(path, limit=limit, follow_symlinks=follow_symlinks)
    return None if data is None else decode_text(data, path)


def decode_text(data: bytes, path: Path) -> str:
    """data as UTF-8 text; UnsafeFile naming path and the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UnsafeFile(path, f"line {line}: expected UTF-8 text, found byte 0x{data[exc.start]:02x}") from exc


# --- by directory fd: where someone other than root owns a directory on the way ----------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40  # as the kernel's path walk


@dataclass(frozen=True)
class Owners:
    """Who besides root may own a directory on a path the agent opens as root (the admin for its home,
    prometheus for the textfile directory), and which groups besides root's may write to one."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()


def _trusted_uids(owners: Owners) -> frozenset[int]:
    return owners.uids | {0, os.geteuid()}


def _replaceable_by_others(info: os.stat_result, owners: Owners) -> str | None:
    """Why someone not trusted could replace what is in this directory (None: nobody can)."""
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid not in _trusted_uids(owners):
        return f"is owned by uid {info.st_uid}"
    if mode & stat.S_IWOTH and not (mode & stat.S_ISVTX and info.st_uid in (0, os.geteuid())):
        return f"is writable by others (mode {mode:04o})"  # a root-owned sticky directory (/tmp) is fine
    if mode & stat.S_IWGRP and info.st_gid not in owners.gids | {0}:
        return f"is writable by group {info.st_gid} (mode {mode:04o})"
    return None


def open_directory(path: Path, owners: Owners = Owners()) -> int:
    """A descriptor of the directory at path (O_RDONLY), opened one component at a time from /.

    Every directory on the way must be owned by root or one of owners.uids and writable by no one else
    (a root-owned sticky directory such as /tmp excepted); a symlink is followed only where only root
    could have put it (owned by root, in a directory only root can change), so what another user can
    replace is never followed. Raises UnsafeFile naming the first component that fails and why,
    FileNotFoundError when one is missing, NotADirectoryError when one is a file. The caller closes
    the descriptor."""
    if not path.is_absolute():
        raise ValueError(f"open_directory needs an absolute path, not {path}")
    stack = [(os.open("/", _DIR_FLAGS), Path("/"))]
    pending = list(path.parts[1:])
    links = 0
    try:
        info = os.fstat(stack[-1][0])
        problem = _replaceable_by_others(info, Owners())
        if problem is not None:
            raise UnsafeFile(Path("/"), problem)
        while pending:
            name = pending.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            parent_fd, parent = stack[-1]
            where = parent / name
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                entry = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                if not stat.S_ISLNK(entry.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(where)) from exc
                target = os.readlink(name, dir_fd=parent_fd)
                changeable = _replaceable_by_others(os.fstat(parent_fd), Owners())
                if entry.st_uid != 0 or changeable is not None:
                    whose = f"{parent} {changeable}" if changeable else f"it is owned by uid {entry.st_uid}"
                    raise UnsafeFile(where, f"is a symlink to {target!r} and {whose}; not following it") from exc
                links += 1
                if links > _MAX_SYMLINKS:
                    raise UnsafeFile(where, "too many levels of symlinks") from exc
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop()[0])
                pending = list(Path(target).parts[1 if target.startswith("/") else 0 :]) + pending
                continue
            stack.append((fd, where))
            problem = _replaceable_by_others(os.fstat(fd), owners)
            if problem is not None:
                raise UnsafeFile(where, problem)
        fd = stack.pop()[0]
        return fd
    finally:
        for fd, _ in stack:
            os.close(fd)


@contextlib.contextmanager
def opened_directory(path: Path, owners: Owners = Owners()) -> Iterator[int]:
    """open_directory as a context: the descriptor is closed when the block ends."""
    fd = open_directory(path, owners)
    try:
        yield fd
    finally:
        os.close(fd)


def read_regular_at(
    dir_fd: int, name: str, path: Path, *, limit: int = MAX_CONFIG_BYTES
) -> tuple[bytes, os.stat_result] | None:
    """Bytes and stat of the regular file name in the directory dir_fd (path: how to name it in errors),
    None when it does not exist; never a symlink, a FIFO or past limit."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(path, f"is a symlink to {os.readlink(name, dir_fd=dir_fd)!r}; not following it") from exc
        raise
    return _read_opened(fd, path, limit)


def atomic_write_at(dir_fd: int, name: str, content: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """atomic_write into the directory dir_fd (from open_directory): a temporary file made there with
    O_EXCL, then renamed over name; what is at name (a symlink too) is replaced, never followed."""
    tmp_name = f".{name}{TMP_MARKER}{os.urandom(6).hex()}"
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name, dir_fd=dir_fd)
        raise
    if durable:
        os.fsync(dir_fd)


def remove_at(dir_fd: int, name: str) -> None:
    """Remove name from the directory dir_fd; a missing one is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


@dataclass(frozen=True)
class Fingerprint:
    inode: int
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: Path) -> Fingerprint | None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return None
        return cls(info.st_ino, info.st_mtime_ns, info.st_size)


class EchoFilter:
    """Remembers the agent's own writes so their inotify echo does not trigger another converge."""

    def __init__(self, ttl: float = 5.0) -> None:
        self._ttl = ttl
        self._lock = threading.Lock()
        self._written: dict[str, tuple[Fingerprint | None, float]] = {}

    def expect(self, path: Path, fingerprint: Fingerprint | None) -> None:
        """Called *before* the agent's own change lands, so its event can never arrive first."""
        with self._lock:
            self._written[os.fspath(path)] = (fingerprint, time.monotonic() + self._ttl)

    def record(self, path: Path) -> None:
        self.expect(path, Fingerprint.of(path))

    def is_echo(self, path: str) -> bool:
        if TMP_MARKER in os.path.basename(path):
            return True
        with self._lock:
            entry = self._written.get(path)
            if entry is None:
                return False
            fingerprint, expires = entry
            if time.monotonic() > expires:
                del self._written[path]
                return False
        return Fingerprint.of(Path(path)) == fingerprint


def atomic_write(
    path: Path,
    content: bytes,
    *,
    mode: int | None = None,
    owner: tuple[int, int] | None = None,
    echo: EchoFilter | None = None,
    durable: bool = True,
) -> None:
    """Write by rename in the same directory: readers see the old or the new file, never half of one.

    A symlink at path is replaced, never followed. Mode and owner default to the existing file's.
    """
    directory = path.parent
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None and stat.S_ISREG(existing.st_mode):
        mode = stat.S_IMODE(existing.st_mode) if mode is None else mode
        owner = (existing.st_uid, existing.st_gid) if owner is None else owner
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARKER}", dir=directory)
    except OSError as exc:
        from agent.system import outside

        if exc.errno != errno.EROFS or not outside.available(path):
            raise
        # /etc itself is read-only to the service (ProtectSystem=strict): the helper writes it, outside
        outside.write(path, content, 0o644 if mode is None else mode, owner or (0, 0))
        if echo is not None:
            echo.expect(path, Fingerprint.of(path))
        return
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fchmod(handle.fileno(), 0o644 if mode is None else mode)
            if owner is not None and os.geteuid() == 0:
                os.fchown(handle.fileno(), *owner)
            if durable:
                os.fsync(handle.fileno())
            written = os.fstat(handle.fileno())
        if echo is not None:
            # rename keeps inode, mtime and size: this is what the file will look like once in place
            echo.expect(path, Fingerprint(written.st_ino, written.st_mtime_ns, written.st_size))
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if durable:
        _fsync_dir(directory)


def remove(path: Path, *, echo: EchoFilter | None = None) -> None:
    if echo is not None:
        echo.expect(path, None)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, mode: int = 0o755) -> None:
    path.mkdir(mode=mode, parents=True, exist_ok=True)


# a filesystem that cannot take a write: not the agent's fault, nor the admin's config; it may pass
RESOURCE_ERRNOS = {errno.ENOSPC: "full", errno.EDQUOT: "over its quota", errno.EROFS: "read-only"}


def resource_problem(exc: BaseException, where: Path | None = None) -> str | None:
    """For a write refused by its filesystem (full, over quota, read-only): which filesystem, how full;
    None for any other error. where: the path being written, when the error does not name one."""
    if not isinstance(exc, OSError) or exc.errno not in RESOURCE_ERRNOS:
        return None
    where = Path(os.fsdecode(exc.filename)) if exc.filename else where
    if where is None:
        return f"{exc.strerror}: a filesystem is {RESOURCE_ERRNOS[exc.errno]}"
    mount = mount_point(where)
    room = ""
    if exc.errno != errno.EROFS:
        with contextlib.suppress(OSError):
            info = os.statvfs(mount)
            room = f", {info.f_bavail * info.f_frsize // 1024} of {info.f_blocks * info.f_frsize // 1024} KiB free"
    return f"{where}: {exc.strerror} (the filesystem mounted at {mount} is {RESOURCE_ERRNOS[exc.errno]}{room})"


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, frozenset[str]]]:
    """Each mount point and its per-mount options (ro/rw, ...) as that process's mount namespace has them;
    raises OSError when the file cannot be read."""
    with open(mountinfo, encoding="utf-8", errors="replace") as handle:
        rows = [line.split() for line in handle]
    return [(_unescape(row[4]), frozenset(row[5].split(","))) for row in rows if len(row) > 5]


def covering_mount(path: Path, found: list[tuple[str, frozenset[str]]]) -> tuple[str, frozenset[str]]:
    """The mount path lies under (the longest mount point that is a prefix of it; the last one mounted wins)."""
    text = os.path.abspath(path)
    inside = [m for m in found if text == m[0] or text.startswith(m[0].rstrip("/") + "/")]
    best = max((len(m[0]) for m in inside), default=-1)
    return [m for m in inside if len(m[0]) == best][-1] if inside else ("/", frozenset())


def mount_point(path: Path) -> Path:
    """The mount point path lies under, as this process's mount namespace has it (a bind mount too)."""
    try:
        found = mounts()
    except OSError:
        found = []
    return Path(covering_mount(path, found)[0])


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
