"""A small stand-in for `sshd -T`/`sshd -t` for unit tests' edge cases (the integration tests use the real one)."""

from __future__ import annotations

from agent.controls.ssh.sshd_config import read_graph
from agent.paths import SystemRoot
from tests.unit.conftest import DeclaredCommands

DEFAULTS = {
    "port": ["22"],
    "permitrootlogin": ["without-password"],
    "passwordauthentication": ["yes"],
    "pubkeyauthentication": ["yes"],
    "authorizedkeysfile": [".ssh/authorized_keys .ssh/authorized_keys2"],
    "pidfile": ["/run/sshd.pid"],
}
_PRINTED = {"prohibit-password": "without-password"}


def effective(pairs: list[tuple[str, str]], penalties: bool = False) -> dict[str, list[str]]:
    values = {k: list(v) for k, v in DEFAULTS.items()}
    if penalties:  # OpenSSH 9.8+
        values["persourcepenaltyexemptlist"] = ["none"]
    seen: set[str] = set()
    for keyword, value in pairs:
        value = _PRINTED.get(value.lower(), value)
        if keyword == "port":
            values["port"] = values["port"] + [value] if "port" in seen else [value]
        elif keyword not in seen:
            values[keyword] = [value]
        seen.add(keyword)
    return values


def render(values: dict[str, list[str]]) -> str:
    return "".join(f"{k} {v}\n" for k, vs in values.items() for v in vs)


class FakeSshd:
    def __init__(self, root: SystemRoot, reject: str | None = None, penalties: bool = False) -> None:
        self.root = root
        self.reject = reject  # sshd -t/-T fail with this message when set
        self.penalties = penalties  # knows PerSourcePenaltyExemptList, as OpenSSH 9.8+ (Debian 13)

    def __call__(self, argv: list[str]) -> tuple[int, str, str]:
        if "/dev/null" in argv:
            options = [argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-o"]
            return 0, render(effective([(k.lower(), v) for k, v in options], self.penalties)), ""
        if self.reject:
            return 255, "", self.reject
        graph = read_graph(self.root)
        pairs = [(d.keyword, d.first_arg) for d in graph.directives if not d.in_match]
        if "-t" in argv:
            return 0, "", ""
        return 0, render(effective(pairs, self.penalties)), ""


def install(
    commands: DeclaredCommands, root: SystemRoot, reject: str | None = None, penalties: bool = False
) -> FakeSshd:
    fake = FakeSshd(root, reject, penalties)
    commands.expect_with(["/usr/sbin/sshd"], fake)
    return fake
