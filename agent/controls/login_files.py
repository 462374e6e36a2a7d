"""The strict profile's edits of two files no drop-in directory serves: shadow's /etc/login.defs (new
accounts' UMASK, the SHA-512 rounds of chpasswd and newusers) and the legal banner in /etc/issue and
/etc/issue.net. Text in, text out: the strict guard (agent/controls/strict.py) observes and plans with these.

login.defs is edited line by line, the admin's other lines byte for byte: a line that sets a kept key
another way is commented out with a marker (shadow reads the last line for a key; Lynis reads every one),
and the kept values follow at the end under one comment. A banner is the admin's own once it warns (any
of its words below): only Debian's stock text, or none, is replaced."""

from __future__ import annotations

import re

from agent.controls.base import line_end

MARKER = "vps-agent"
# profile: strict's login.defs values, each with why (docs/strict-profile.md)
LOGIN_DEFS = (
    ("UMASK", "027"),  # new home directories 0750 and pam_umask's default: not readable by every account
    ("SHA_CRYPT_MIN_ROUNDS", "65536"),  # passwords chpasswd and newusers hash with SHA-512 (PAM's passwd
    ("SHA_CRYPT_MAX_ROUNDS", "65536"),  # uses yescrypt on Debian and is unaffected): 13 times the default
)
BLOCK = f"# [{MARKER}] profile: strict keeps these (docs/strict-profile.md); only new accounts and hashes change\n"
BANNER = (
    "Authorised access only. This is a private system: activity is monitored and logged, and\n"
    "unauthorised use is prohibited and may be reported to law enforcement.\n"
)
# a banner with any of these is a warning the admin wrote: kept as it is
_WARNS = re.compile(r"authori[sz]|prohibit|monitor|legal|private|unauthori", re.I)


def _setting(line: str) -> tuple[str, str] | None:
    """(KEY, value) of an active login.defs line, or None for a comment or a blank line."""
    words = line.split()
    if not words or words[0].startswith("#"):
        return None
    return words[0], words[1] if len(words) > 1 else ""


def login_defs_wrong(text: str) -> list[tuple[int, str, str]]:
    """(line number or 0, key, what it is instead): every line or absence that differs from LOGIN_DEFS.
    Compliant: each kept key on exactly one active line, with the kept value."""
    wanted = dict(LOGIN_DEFS)
    right: dict[str, int] = {}  # key -> the line that keeps it
    wrong = []
    for n, line in enumerate(text.splitlines(), 1):
        found = _setting(line)
        if found is None or found[0] not in wanted:
            continue
        key, value = found
        if value != wanted[key]:
            wrong.append((n, key, value or "(empty)"))
        elif key in right:
            wrong.append((n, key, f"repeated (line {right[key]} sets it)"))
        else:
            right[key] = n
    explained = {key for _, key, _ in wrong}
    return wrong + [(0, key, "unset") for key in wanted if key not in right and key not in explained]


def login_defs_fixed(text: str, stamp: str) -> str:
    """The file with every line that sets a kept key another way (or again) commented out, and the kept
    values that are not in place appended under the agent's comment; the rest byte for byte."""
    wanted = dict(LOGIN_DEFS)
    lines = text.splitlines(keepends=True)
    kept: set[str] = set()
    for n, line in enumerate(lines):
        found = _setting(line)
        if found is None or found[0] not in wanted:
            continue
        key, value = found
        if value == wanted[key] and key not in kept:
            kept.add(key)
            continue
        lines[n] = f"# [{MARKER} {stamp}] neutralised, the agent keeps {key} {wanted[key]}: {line.strip()}" + line_end(
            line
        )
    missing = [(key, value) for key, value in LOGIN_DEFS if key not in kept]
    end = next((line_end(line) for line in lines if line_end(line)), "\n")
    if missing:
        if lines and not line_end(lines[-1]):
            lines[-1] += end
        block = BLOCK if BLOCK.rstrip("\n") not in text else ""
        lines.append(block.replace("\n", end))
        lines += [f"{key}\t{value}{end}" for key, value in missing]
    return "".join(lines)


def banner_replaced(current: bytes | None) -> bool:
    """Whether the agent writes its banner here: the file is missing, or holds no warning (Debian's own
    "Debian GNU/Linux 12 \\n \\l"). The admin's own warning, in any words of _WARNS, is kept."""
    if current is None:
        return True
    return _WARNS.search(current.decode("utf-8", "replace")) is None
