"""A private mount namespace for a fake root, so tools that name absolute paths see the fake root.

sshd's `Include /etc/ssh/sshd_config.d/*.conf` is absolute: to ask the real `sshd -T` about a fake
root, the fake root's /etc/ssh must *be* /etc/ssh for sshd. The agent enters its own mount namespace
(propagation private, so nothing leaks to the host) and bind-mounts the fake root's directories over
the real ones. The host's mounts and files are never changed.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

from agent.paths import SystemRoot

CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2


class NamespaceError(Exception):
    pass


# glibc's soname directly: ctypes.util.find_library would run ldconfig in a subprocess at import
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise NamespaceError(f"{what}: {os.strerror(err)}")


def enter_private_mount_namespace() -> None:
    """unshare(CLONE_NEWNS) and make every mount private; must run before any thread starts."""
    if threading.active_count() > 1:
        raise NamespaceError("a private mount namespace must be entered before any thread starts")
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")


def bind_mount(source: Path, target: Path) -> None:
    _check(_libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None), f"bind {source} on {target}")


def unmount(target: Path) -> None:
    _check(_libc.umount2(os.fsencode(target), MNT_DETACH), f"umount {target}")


def mount_tmpfs(target: Path) -> None:
    _check(_libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", 0, b"mode=0755,size=16m"), f"tmpfs on {target}")


def isolate_fake_root(root: SystemRoot) -> None:
    """Make a fake root's tool-visible directories the real ones, for this process and its children only."""
    if root.is_host:
        return
    if os.geteuid() != 0:
        raise NamespaceError(
            f"--root {root.prefix} needs root: sshd reads absolute Include paths, so the agent binds "
            f"{root.prefix}/etc/ssh over /etc/ssh inside a private mount namespace"
        )
    enter_private_mount_namespace()
    bind_fake_root(root)


def bind_fake_root(root: SystemRoot) -> list[Path]:
    """Bind the fake root's directories over the real ones (already inside a private namespace)."""
    mounted = []
    for absolute in root.tool_visible_dirs:
        source = root.path(absolute)
        source.mkdir(parents=True, exist_ok=True)
        target = Path(absolute)
        if not target.is_dir():
            continue  # the tool is not installed on this host: nothing to show it, and /etc stays as it is
        bind_mount(source, target)
        mounted.append(target)
    # sshd -t/-T insist on its privilege-separation directory; give it a private /run/sshd.
    privsep = Path("/run/sshd")
    if not privsep.is_dir():
        privsep.mkdir(mode=0o755)
    return mounted
