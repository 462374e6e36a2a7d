"""fail2ban: the sshd jail disabled by a later .local -> the jail enabled again per `fail2ban-client -d`.

The fake root carries this machine's stock /etc/fail2ban; the daemon binds it over /etc/fail2ban in its
own mount namespace, so the real `fail2ban-client -d`/`-t` read it. fail2ban-server is never started
(a fake root): the heal ends when the configuration fail2ban would load has the jail on again.
"""

from __future__ import annotations

import os
import time

from common import NO_FLAP, Daemon, DriftKind, Section, bench_config, heal_report, measure_heals, running_daemon

from agent.controls.fail2ban import parse_dump

TARGET_P99_MS = 250.0
LATER = "etc/fail2ban/jail.d/zzz-off.local"  # sorts after the agent's zz-vps-agent.local, so it would win


def disable_jail(daemon: Daemon) -> float:
    """An atomic save (temp file + rename, as editors and config tools do) of a later .local."""
    path = daemon.root / LATER
    temp = path.with_name(".zzz-off.local.tmp")
    t0 = time.time()
    temp.write_text("[sshd]\nenabled = false\n")
    os.rename(temp, path)
    return t0


def verify(daemon: Daemon) -> str:
    result = daemon.in_mountns("fail2ban-client", "-d")
    if result.returncode != 0:
        return f"fail2ban-client -d exited {result.returncode}: {result.stderr.strip()[-300:]}"
    jail = parse_dump(result.stdout)
    if jail is None or jail.get("port") != "2222":
        return f"fail2ban-client -d: sshd jail {jail}"
    return ""


KIND = DriftKind("sshd jail disabled (later .local: enabled = false)", "", disable_jail, verify)


def run(runs: int) -> Section:
    section = Section("fail2ban: the sshd jail disabled -> healed")
    with running_daemon(bench_config(**NO_FLAP)) as daemon:
        heals = measure_heals(daemon, "fail2ban", [KIND], runs, gap=0.2)
    section.add(
        f"Method: the real daemon against a fake root with Debian's stock /etc/fail2ban. {runs} times, 200 ms"
        f" apart: an atomic save of `/{LATER}` with `[sshd] enabled = false` (read after the agent's"
        " `zz-vps-agent.local`, so it would switch the jail off). The agent comments the line out after a backup."
        " Healed = the `drift-reverted` event, emitted after `fail2ban-client -d` (the configuration fail2ban"
        " would load) shows the jail on again; every heal is checked afterwards with `fail2ban-client -d` in the"
        " daemon's mount namespace. No fail2ban-server runs in a fake root: on a host the heal also runs"
        " `fail2ban-client reload` and `status sshd`, not in these numbers.",
        "",
    )
    heal_report(section, heals, "fail2ban drift heal", TARGET_P99_MS)
    return section
