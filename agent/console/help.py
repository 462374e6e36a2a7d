"""Each verb's --help: what it does, who may run it, and its exit codes (vps-agentctl(8) says the same)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

READERS = "root or a member of group adm (asks the daemon)"
ROOT = "root (changes the system, through the daemon)"
LOCAL = "root (reads the system itself; needs no daemon)"


@dataclass(frozen=True)
class Verb:
    name: str
    summary: str  # one line, in the list of commands
    description: str
    who: str  # who may run it
    exits: tuple[tuple[int, str], ...]

    def wrapped_description(self) -> str:
        return textwrap.fill(self.description, 79)

    def epilog(self) -> str:
        lines = [f"Who: {self.who}."]
        lines.append("Exit codes:")
        lines += [f"  {code}  {meaning}" for code, meaning in self.exits]
        return "\n".join(lines)


UNREACHABLE = (3, "the daemon is unreachable (not running, or permission denied)")
VERBS = (
    Verb(
        "status",
        "where the machine stands, per control (from the daemon)",
        "A verdict line, the daemon's line, then one row per guard: its status, since when, and why. "
        "On a terminal, colour and DETAIL trimmed to the width; -l/--full (or a pipe) shows every character.",
        READERS,
        (
            (0, "every guard compliant or healed"),
            (1, "drift, pending proof, flapping, a paused guard with drift, or an SSH port move in flight"),
            (2, "a guard blocked, failed or in error"),
            UNREACHABLE,
        ),
    ),
    Verb(
        "check",
        "observe every control now, without the daemon; changes nothing",
        "Observe each control (or only CONTROL) as the daemon would, and judge it, without changing anything.",
        LOCAL,
        ((0, "compliant"), (1, "drift: the daemon would change something"), (2, "blocked, error, or a bad config")),
    ),
    Verb(
        "diff",
        "print what the agent would change (the dry-run plan), without the daemon",
        "The plan for each drifted control as a unified diff, with what is held back and why.",
        LOCAL,
        (
            (0, "nothing to change"),
            (1, "changes planned, or settings held"),
            (2, "cannot plan, blocked, or a bad config"),
        ),
    ),
    Verb(
        "events",
        "recent events from the daemon (or its events file when it is down)",
        "One line per event: local time to the second, control, action, outcome (- where none applies) and a "
        "summary. --diff shows what each drift and heal changed; --json the events as written to events.jsonl.",
        READERS,
        ((0, "events shown"), (2, "a bad argument"), (3, "the daemon is unreachable and its events file unreadable")),
    ),
    Verb(
        "pause",
        "stop reverting drift (it is still reported) so you can edit by hand",
        "Pause one control (or all): drift is reported, not reverted, until `resume` or the --for time is up.",
        ROOT,
        ((0, "paused"), (2, "refused: no such control, a bad duration, or not root"), UNREACHABLE),
    ),
    Verb(
        "resume",
        "end a pause and converge at once",
        "End the pause of one control (or all); it converges at once.",
        ROOT,
        ((0, "resumed"), (2, "refused: no such control, or not root"), UNREACHABLE),
    ),
    Verb(
        "converge",
        "converge now and wait for the outcome",
        "Converge one control (or all) now, wait for the outcome and show it as `status` does.",
        ROOT,
        (
            (0, "compliant or healed"),
            (1, "drift left (pending, paused, flapping)"),
            (2, "blocked or failed"),
            UNREACHABLE,
        ),
    ),
    Verb(
        "reload",
        "re-read the config file (an invalid one is rejected, the old stays)",
        "Re-read the config file; an invalid one is rejected with every error it has, and the old one stays.",
        ROOT,
        ((0, "reloaded"), (2, "the config was rejected, or not root"), UNREACHABLE),
    ),
    Verb(
        "enforce",
        "switch the firewall guard from report mode to enforce (the first install starts in report)",
        "Set firewall.mode: enforce in /etc/vps-agent/config.yaml (that value only, edited in place: comments "
        "and every other key stay as they are; the file is validated first and replaced atomically), then "
        "reload the daemon. While something listens on a port the enforced firewall would drop (not in "
        "firewall.allow_tcp/allow_udp, not SSH), it names them and refuses, unless --yes.",
        "root (edits the config, reloads the daemon)",
        (
            (0, "enforced (the config says so and the daemon reloaded it)"),
            (1, "refused: enforcing would cut off the listeners it names (nothing changed; --yes to cut them)"),
            (2, "a bad config or firewall.enabled false (nothing changed), the daemon rejected it, or not root"),
            (3, "the daemon is unreachable: the file is changed, the daemon enforces when it starts"),
        ),
    ),
    Verb(
        "confirm",
        "vouch for what waits for proof: the new SSH port works, a sudo admin's key logs in",
        "Vouch for what waits for proof: the new SSH port works (the old one closes), a sudo admin's key logs "
        "in (password logins go off).",
        ROOT,
        (
            (0, "confirmed, and compliant"),
            (1, "nothing waited for proof, or drift is left"),
            (2, "an error, or not root"),
            UNREACHABLE,
        ),
    ),
    Verb(
        "upgrade",
        "show the upgrade schedule; with --now, run apt update + upgrade now",
        "Without --now: the upgrade scheduler's state. With --now: apt update and upgrade now, waiting for the "
        "outcome unless --no-wait.",
        "root or a member of group adm; --now: root",
        (
            (0, "shown, or the upgrade succeeded or had nothing to do"),
            (1, "not started (one is running)"),
            (2, "the upgrade failed"),
            UNREACHABLE,
        ),
    ),
    Verb(
        "validate-config",
        "check a config file and exit 0 (valid) or 2",
        "Check a config file; every error is listed as FILE:LINE:COLUMN: key: expected ..., got ....",
        "anyone who can read the file",
        ((0, "valid"), (2, "invalid: every error is printed")),
    ),
)
