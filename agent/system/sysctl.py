"""The door to the kernel's live tunables: /proc/sys under the SystemRoot (a fake root's DIR/proc/sys in
tests), read and written directly, the way `sysctl -w` does it (one write of the value), and the few
network facts the sysctl guard's conditions rest on (interfaces, the IPv6 default routes)."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from agent.paths import SystemRoot
from agent.system import fs

MAX_VALUE = 4096
RTF_REJECT = 0x0200
RTF_ADDRCONF = 0x00040000  # the route was learned from a router advertisement (`ip -6 route`: proto ra)
MISSING = "missing from this kernel"
# a few net.* keys (net.core.bpf_jit_harden) exist in the host's network namespace only
MISSING_NET = "missing here: this kernel lacks it, or it is global and so absent from a container's network namespace"
READ_ONLY = "read-only here (a container's /proc/sys, or no permission): set it on the host"


@dataclass(frozen=True)
class Live:
    """One key as the kernel shows it: its value (whitespace runs as one space), and whether the agent may
    write it; problem says why it cannot (None: readable and writable)."""

    value: str | None
    writable: bool
    problem: str | None = None
    missing: bool = False  # the kernel (or this network namespace) has no such key


def key_path(root: SystemRoot, key: str) -> Path:
    return root.proc_sys / key.replace(".", "/")


def normalise(value: str) -> str:
    return " ".join(value.split())


# PID 1's view of the mounts: a container manager makes /proc/sys read-only for the container's init, and a
# service's own mount namespace may not keep that (systemd's ProtectSystem=strict leaves /proc writable)
INIT_MOUNTINFO = "/proc/1/mountinfo"
READ_ONLY_FOR_INIT = "read-only for this system's init (a container's /proc/sys): set it on the host"


def init_mounts(root: SystemRoot) -> list[tuple[str, frozenset[str]]] | None:
    """PID 1's mounts; None when they cannot be read. In a container whose init's mounts cannot be read
    (systemd says it is one), only the network namespace's own net.* keys count as writable."""
    try:
        return fs.mounts(INIT_MOUNTINFO)
    except OSError:
        if root.container_marker.exists():
            return [
                (os.fspath(root.proc_sys), frozenset({"ro"})),
                (os.fspath(root.proc_sys / "net"), frozenset({"rw"})),
            ]
        return None


def read(
    root: SystemRoot, key: str, init: list[tuple[str, frozenset[str]]] | None = None, expected: str | None = None
) -> Live:
    """A key's value and whether it may be written: writable in this process's mount namespace and in
    PID 1's (init: its mounts, from init_mounts; None: not known). A value equal to `expected` needs no
    write, and its writability is not looked at (the poll reads every kept key every 2 s)."""
    path = key_path(root, key)
    try:
        value = _value(path)
    except (FileNotFoundError, NotADirectoryError):
        return Live(None, False, MISSING_NET if key.startswith("net.") else MISSING, missing=True)
    except OSError as exc:  # no permission, a write-only key, or one the kernel refuses to show
        return Live(None, False, exc.strerror or str(exc))
    if value == expected:
        return Live(value, True)
    if not os.access(path, os.W_OK):
        return Live(value, False, READ_ONLY)
    if init is not None and "ro" in fs.covering_mount(path, init)[1]:
        return Live(value, False, READ_ONLY_FOR_INIT)
    return Live(value, True)


def peek(root: SystemRoot, key: str) -> str | None:
    """A key's value as the kernel shows it now, whitespace runs as one space; None: missing or unreadable.
    The poll's cheap look: one open and one read, nothing about writability."""
    try:
        return _value(key_path(root, key))
    except OSError:
        return None


def _value(path: Path) -> str:
    """One open and one read of a /proc/sys file, whitespace runs as one space; OSError as the kernel says."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return normalise(os.read(fd, MAX_VALUE).decode("utf-8", "replace"))
    finally:
        os.close(fd)


def interface_names(root: SystemRoot) -> tuple[str, ...]:
    try:
        return tuple(sorted(os.listdir(root.net_class)))
    except OSError:
        return ()


def write(root: SystemRoot, key: str, value: str) -> None:
    """Set a live value; raises OSError with the kernel's answer (EINVAL, EPERM, EROFS, ENOENT)."""
    path = key_path(root, key)
    # no O_CREAT: a key the kernel does not have is never made (a fake root's files are made by its test)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        data = value.encode() + b"\n"
        if os.write(fd, data) != len(data):
            raise OSError(errno.EIO, f"short write to {path}")
    finally:
        os.close(fd)


def interfaces(root: SystemRoot) -> dict[str, str]:
    """Each network interface and its kind: "bridge", the uevent's DEVTYPE (wireguard, vlan, ...) or ""."""
    try:
        names = sorted(os.listdir(root.net_class))
    except OSError:
        return {}
    found: dict[str, str] = {}
    for name in names:
        entry = root.net_class / name
        kind = "bridge" if (entry / "bridge").is_dir() else ""
        if not kind:
            try:
                uevent = (entry / "uevent").read_text(errors="replace")
            except OSError:
                uevent = ""
            kind = next((line[8:].strip() for line in uevent.splitlines() if line.startswith("DEVTYPE=")), "")
        found[name] = kind
    return found


def ipv6_default_routes(root: SystemRoot) -> list[tuple[str, bool]]:
    """The IPv6 default routes (each device, and whether a router advertisement made it); [] when unknown."""
    try:
        text = root.ipv6_route.read_text(errors="replace")
    except OSError:
        return []
    routes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or fields[0] != "0" * 32 or fields[1] != "00":
            continue
        try:
            flags = int(fields[8], 16)
        except ValueError:
            continue
        if flags & RTF_REJECT or fields[9] == "lo":
            continue
        routes.append((fields[9], bool(flags & RTF_ADDRCONF)))
    return routes


def ipv4_default_routes(root: SystemRoot) -> list[str]:
    """The devices of the IPv4 default routes in the main table; [] when unknown."""
    try:
        text = root.ipv4_route.read_text(errors="replace")
    except OSError:
        return []
    rows = [line.split() for line in text.splitlines()[1:]]
    return [row[0] for row in rows if len(row) > 7 and row[1] == "00000000" and row[7] == "00000000"]
