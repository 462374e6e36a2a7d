"""sshd_config as sshd reads it: the main file with its Includes expanded in order, each directive placed;
and what sshd itself says of its configuration (`sshd -T`: the ports it binds, whether it takes passwords)."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from agent.paths import SystemRoot
from agent.system import fs
from agent.system.run import run

MAIN_CONFIG = "/etc/ssh/sshd_config"
SSHD = "/usr/sbin/sshd"
DEFAULT_INCLUDE = "/etc/ssh/sshd_config.d/*.conf"
_DIRECTIVE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9]*)(?:\s*=\s*|\s+)(.*?)\s*$")
_MAX_INCLUDE_DEPTH = 16
_LINE = re.compile(r"[^\n]*\n|[^\n]+\Z")  # sshd reads up to \n (fgets); a \r before it is trailing whitespace


def sshd_lines(text: str) -> list[str]:
    """A file's lines as sshd counts them, each with its own line end ("\n", "\r\n"; the last may have
    none): \n breaks a line and nothing else does (str.splitlines() also breaks at \f, \v, \x85, ...)."""
    return _LINE.findall(text)


@dataclass(frozen=True)
class Directive:
    path: str  # as sshd names it
    line: int  # 1-based
    keyword: str  # lower case
    value: str  # as written
    in_match: bool

    @property
    def first_arg(self) -> str:
        parts = self.value.split()
        return parts[0].strip('"') if parts else ""


@dataclass(frozen=True)
class ConfigGraph:
    """Every directive in the order sshd meets them, and the text of every file read."""

    directives: tuple[Directive, ...]
    texts: tuple[tuple[str, str], ...]  # (system path, text) in read order
    unreadable: tuple[tuple[str, str], ...]  # (system path, why)

    def text_of(self, path: str) -> str | None:
        return dict(self.texts).get(path)


def read_graph(root: SystemRoot, restoring: str | None = None) -> ConfigGraph:
    """sshd's configuration files and their directives in the order sshd reads them. restoring: an Include
    pattern the SSH guard is about to put back above the main file's first directive; the files it pulls in
    are read as sshd will read them then (first), so what they hold is judged before it takes effect."""
    directives: list[Directive] = []
    texts: dict[str, str] = {}
    unreadable: list[tuple[str, str]] = []
    for included in expand_include(root, restoring) if restoring else ():
        _read_file(root, included, 1, directives, texts, unreadable)
    _read_file(root, MAIN_CONFIG, 0, directives, texts, unreadable)
    return ConfigGraph(tuple(directives), tuple(texts.items()), tuple(unreadable))


def _read_file(
    root: SystemRoot,
    system_path: str,
    depth: int,
    directives: list[Directive],
    texts: dict[str, str],
    unreadable: list[tuple[str, str]],
) -> None:
    if depth > _MAX_INCLUDE_DEPTH or system_path in texts:
        return
    try:
        text = fs.read_text(root.path(system_path), follow_symlinks=True)
    except (fs.UnsafeFile, OSError) as exc:
        unreadable.append((system_path, str(getattr(exc, "why", exc))))
        return
    if text is None:
        return
    texts[system_path] = text
    in_match = False
    for number, raw in enumerate(sshd_lines(text), start=1):
        parsed = parse_line(raw)
        if parsed is None:
            continue
        keyword, value = parsed
        if keyword == "match":
            in_match = True
        directives.append(Directive(system_path, number, keyword, value, in_match))
        if keyword == "include":
            for pattern in value.split():
                for included in expand_include(root, pattern.strip('"')):
                    _read_file(root, included, depth + 1, directives, texts, unreadable)


def parse_line(raw: str) -> tuple[str, str] | None:
    stripped = raw.strip()
    if not stripped or stripped.startswith("#"):
        return None
    match = _DIRECTIVE.match(stripped)
    if match is None:
        return None
    return match.group(1).lower(), match.group(2)


def expand_include(root: SystemRoot, pattern: str) -> list[str]:
    """Include patterns as sshd expands them: relative to /etc/ssh, glob-sorted."""
    absolute = pattern if pattern.startswith("/") else os.path.join("/etc/ssh", pattern)
    matches = sorted(glob.glob(os.fspath(root.path(absolute))))
    return [root.system_name(m) for m in matches if os.path.isfile(m)]


def include_covers(root: SystemRoot, directive: Directive, system_path: str) -> bool:
    """Whether an Include directive pulls in system_path (the file may not exist yet)."""
    for pattern in directive.value.split():
        pattern = pattern.strip('"')
        absolute = pattern if pattern.startswith("/") else os.path.join("/etc/ssh", pattern)
        if fnmatchcase(system_path, absolute):
            return True
    return False


def parse_effective(text: str) -> dict[str, tuple[str, ...]]:
    """`sshd -T` output -> keyword -> values (multi-valued keywords such as port keep every line)."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        keyword, _, value = line.strip().partition(" ")
        if keyword:
            values.setdefault(keyword.lower(), []).append(value.strip())
    return {k: tuple(v) for k, v in values.items()}


def ensure_privsep_dir(root: SystemRoot) -> None:
    # sshd -t/-T refuse to run without it; systemd creates it only while ssh.service runs.
    if root.is_host and not root.sshd_privsep_dir.is_dir():
        fs.ensure_dir(root.sshd_privsep_dir, 0o755)


def configured_ports(root: SystemRoot) -> frozenset[int] | None:
    """The TCP ports sshd's effective configuration (`sshd -T`) binds: every ListenAddress as sshd
    resolves it (each with its port; Port alone when there is none). None when sshd -T fails."""
    ensure_privsep_dir(root)
    result = run([SSHD, "-T", "-f", MAIN_CONFIG], timeout=15)
    if not result.ok:
        return None
    effective = parse_effective(result.stdout)
    listen = [address.split()[0] for address in effective.get("listenaddress", ())]
    ports = [address.rsplit(":", 1)[1] for address in listen if ":" in address] or effective.get("port", ())
    return frozenset(int(port) for port in ports if port.isdigit())


def password_logins(root: SystemRoot) -> bool | None:
    """Whether sshd's effective configuration (`sshd -T`) accepts passwords; None when sshd -T fails."""
    ensure_privsep_dir(root)
    result = run([SSHD, "-T", "-f", MAIN_CONFIG], timeout=15)
    if not result.ok:
        return None
    return parse_effective(result.stdout).get("passwordauthentication", ("yes",))[0].lower() == "yes"
