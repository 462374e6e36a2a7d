"""The boot-time sysctl configuration: the *.conf files systemd-sysctl and `sysctl --system` apply, in
their order (by file name across /etc, /run, /usr/local/lib, /usr/lib and /lib sysctl.d, a name in an
earlier directory masking the same name in a later one; /etc/sysctl.conf last), the lines in them that
would override a key the agent keeps, and their neutralisation: commented out with a marker in
/etc/sysctl.d, or (for a vendor file the agent must not edit) masked by a same-named copy in /etc/sysctl.d
with the line commented; every other line stays byte for byte."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from agent.paths import AGENT_SYSCTL_NAME, SystemRoot
from agent.system import fs

MARKER = "vps-agent"
EDIT = "edit"  # a regular file in /etc/sysctl.d: the line is commented out in place
MASK = "mask"  # a file in /run, /usr/local/lib, /usr/lib or /lib: a same-named copy in /etc/sysctl.d masks it
REPORT = "report"  # /etc/sysctl.conf (the agent cannot write /etc) or a link elsewhere: reported to the admin


@dataclass(frozen=True)
class BootFile:
    name: str  # the name it sorts by
    system_path: str  # the file read (the target of /etc/sysctl.d/99-sysctl.conf -> ../sysctl.conf)
    data: bytes
    how: str  # EDIT, MASK or REPORT


@dataclass(frozen=True)
class Assignment:
    key: str  # dotted ('/' separators turned to '.'); may be a glob (systemd 249+)
    value: str  # whitespace runs as one space
    file: BootFile
    line: int  # 1-based

    @property
    def glob(self) -> bool:
        return any(c in self.key for c in "*?[")


def boot_files(root: SystemRoot) -> list[BootFile]:
    """The files applied at boot, in order; the agent's own is among them."""
    chosen: dict[str, tuple[Path, bool]] = {}  # name -> (path, in /etc/sysctl.d)
    for index, directory in enumerate(root.sysctl_dirs):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.endswith(".conf") and not name.startswith(".") and name not in chosen:
                chosen[name] = (directory / name, index == 0)
    files: list[BootFile] = []
    conf = root.sysctl_conf
    for name in sorted(chosen):
        path, in_etc = chosen[name]
        target = Path(os.path.normpath(path.parent / os.readlink(path))) if path.is_symlink() else path
        if target == root.path("/dev/null"):
            continue  # masked, as systemd-sysctl reads it
        how = REPORT if target == conf or (in_etc and target != path) else EDIT if in_etc else MASK
        data = _read(target)
        if data is not None:
            files.append(BootFile(name, root.system_name(target), data, how))
    if not any(f.system_path == root.system_name(conf) for f in files):
        data = _read(conf)
        if data is not None:
            files.append(BootFile("sysctl.conf", root.system_name(conf), data, REPORT))
    return files


def _read(path: Path) -> bytes | None:
    try:
        return fs.read_regular(path, follow_symlinks=True)
    except (OSError, fs.UnsafeFile):
        return None


def assignments(file: BootFile) -> list[Assignment]:
    found = []
    for number, raw in enumerate(file.data.decode("utf-8", "surrogateescape").splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().lstrip("-").strip().replace("/", ".")
        found.append(Assignment(key, " ".join(value.split()), file, number))
    return found


def overrides(files: list[BootFile], kept: dict[str, str]) -> list[tuple[Assignment, str]]:
    """The lines of files sorting after the agent's (and /etc/sysctl.conf) that set a kept key to another
    value, each with the key it overrides."""
    found = []
    for file in files:
        if file.name <= AGENT_SYSCTL_NAME and file.name != "sysctl.conf":
            continue
        for assignment in assignments(file):
            for key, value in kept.items():
                if fnmatch.fnmatchcase(key, assignment.key) and assignment.value != value:
                    found.append((assignment, key))
    return found


def neutralised(file: BootFile, lines: dict[int, str], stamp: str) -> bytes:
    """file's bytes with each numbered line commented out (the reason: what the agent keeps); for a masked
    vendor file, a first line saying what the copy is."""
    text = file.data.decode("utf-8", "surrogateescape").splitlines(keepends=True)
    for number, keeps in lines.items():
        original = text[number - 1]
        body = original.rstrip("\r\n")
        ending = original[len(body) :] or "\n"
        text[number - 1] = f"# [{MARKER} {stamp}] neutralised, the agent keeps {keeps}: {body.strip()}{ending}"
    if file.how == MASK:
        text.insert(
            0, f"# [{MARKER} {stamp}] masks {file.system_path}: a copy of it with the agent's keys neutralised\n"
        )
    return "".join(text).encode("utf-8", "surrogateescape")
