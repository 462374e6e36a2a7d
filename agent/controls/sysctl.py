"""The kernel (sysctl) guard: the agent owns /etc/sysctl.d/60-vps-agent.conf and keeps both that file and
the live values in /proc/sys, which sends no inotify events: they are polled (sysctl.poll_interval) and
read at every reconcile. A later-sorting file that would override a kept key at boot is neutralised
(agent/controls/sysctl_files.py).

Conditions are detected, never guessed: forwarding is left alone while something forwards (a bridge,
WireGuard, docker/LXD/libvirt interfaces, veth, tun/tap); accept_ra, autoconf and IPv6 forwarding while
the IPv6 default route came from a router advertisement; a strict rp_filter (1) is kept loose (2) where
the main table has several IPv4 default routes. A key this kernel lacks, one that is read-only here (a
container's /proc/sys) or one the kernel refuses is a warning, never a heal that fails again and again.
"""

from __future__ import annotations

import datetime
import errno
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.config import Config
from agent.controls import sysctl_files
from agent.controls.base import (
    FINDING,
    FIX,
    WARNING,
    Changes,
    Control,
    Drift,
    DriftItem,
    FileChange,
    Meta,
    ReloadOutcome,
    ReloadPlan,
    SshPorts,
    WatchSpec,
    unified,
)
from agent.paths import SystemRoot
from agent.system import fs, sysctl

HEADER = (
    "# Managed by vps-agent: the kernel settings it keeps (sysctl in /etc/vps-agent/config.yaml).\n"
    "# Edits here are reverted; a later-sorting file setting one of these keys is neutralised.\n"
)
_FORWARDING = re.compile(r"net\.ipv4\.ip_forward|net\.ipv[46]\.conf\.[^.]+\.(?:mc_)?forwarding")
_RA = re.compile(r"net\.ipv6\.conf\.[^.]+\.(?:accept_ra\w*|autoconf|forwarding)")
_RP_FILTER = re.compile(r"net\.ipv4\.conf\.[^.]+\.rp_filter")
_NOT_PERMITTED = (
    "not permitted: the key needs CAP_SYS_ADMIN, which vps-agent.service does not keep, or the kernel allows"
    " no change back until reboot (unprivileged_bpf_disabled=1); systemd-sysctl applies the agent's file at"
    " boot, `sysctl --system` now"
)
_FORWARDING_KINDS = frozenset({"bridge", "wireguard", "vxlan", "geneve"})
_FORWARDING_NAMES = ("docker", "veth", "lxd", "lxc", "virbr", "vnet", "wg", "tun", "tap", "podman", "cni")


@dataclass(frozen=True)
class SysctlDesired:
    wanted: tuple[tuple[str, str], ...]  # the configured keys, before the conditions


@dataclass(frozen=True)
class SysctlObserved:
    live: Mapping[str, sysctl.Live]
    own: bytes | None  # the agent's file
    own_problem: str | None  # e.g. a symlink planted at its path
    files: tuple[sysctl_files.BootFile, ...]
    forwarders: tuple[str, ...]  # "docker0 (bridge)"
    ra_route: str | None  # the device whose IPv6 default route came from an RA
    ipv4_defaults: tuple[str, ...]
    proc_sys: bool = True  # False: no /proc/sys under this root (a fake root without one)


@dataclass
class Assessment:
    """What the guard keeps on this host, and how the host differs from it."""

    kept: dict[str, str]  # key -> value, after the conditions
    left: dict[str, str] = field(default_factory=dict)  # key -> why a condition leaves it alone
    loosened: dict[str, str] = field(default_factory=dict)  # key -> why its value was changed
    live_fixes: list[tuple[str, str, str]] = field(default_factory=list)  # key, wanted, live
    file_text: str = ""
    overrides: list[tuple[sysctl_files.Assignment, str]] = field(default_factory=list)


class SysctlControl(Control[SysctlObserved, SysctlDesired]):
    name = "sysctl"

    def __init__(self, root: SystemRoot) -> None:
        super().__init__(root)
        self._refused: dict[str, tuple[str, str]] = {}  # key -> (value, the kernel's answer)
        self._assessed: tuple[SysctlObserved, SysctlDesired, dict[str, tuple[str, str]], Assessment] | None = None

    def meta(self, config: Config) -> Meta:
        return Meta.of(config.sysctl)

    def poll_interval(self, config: Config) -> float | None:
        return config.sysctl.poll_interval

    def poll_fingerprint(self, config: Config) -> object | None:
        """The kept keys' live values and the network interfaces (a new bridge, WireGuard or Docker link
        changes what is kept): a read of each /proc/sys file, no parsing. A full look every 2 s cost 0.16% of
        a core; this is what tells it is needed."""
        values = tuple(sysctl.peek(self.root, key) for key, _ in config.sysctl.wanted())
        return values, sysctl.interface_names(self.root)

    def watches(self, config: Config) -> Sequence[WatchSpec]:
        conf = self.root.sysctl_conf
        specs = [WatchSpec(directory) for directory in self.root.sysctl_dirs]
        return [*specs, WatchSpec(conf.parent, frozenset({conf.name}))]

    def desired(self, config: Config, ssh: SshPorts) -> SysctlDesired:
        return SysctlDesired(config.sysctl.wanted())

    def observe(self, desired: SysctlDesired) -> SysctlObserved:
        init = sysctl.init_mounts(self.root)
        live = {key: sysctl.read(self.root, key, init, value) for key, value in desired.wanted}
        try:
            own, problem = fs.read_regular(self.root.sysctl_dropin), None
        except fs.UnsafeFile as exc:
            own, problem = None, exc.why
        interfaces = sysctl.interfaces(self.root)
        forwarders = tuple(
            f"{name} ({kind or 'interface'})"
            for name, kind in interfaces.items()
            if kind in _FORWARDING_KINDS or name.startswith(_FORWARDING_NAMES)
        )
        ra_route = next((device for device, from_ra in sysctl.ipv6_default_routes(self.root) if from_ra), None)
        files = tuple(sysctl_files.boot_files(self.root))
        routes = tuple(sysctl.ipv4_default_routes(self.root))
        return SysctlObserved(live, own, problem, files, forwarders, ra_route, routes, self.root.proc_sys.is_dir())

    # diff ---------------------------------------------------------------------------------------------

    def assess(self, observed: SysctlObserved, desired: SysctlDesired) -> Assessment:
        # facts(), diff() and plan() of one converge judge the same observation: once (a poll every 2 s)
        last = self._assessed
        if last is not None and last[0] is observed and last[1] is desired and last[2] == self._refused:
            return last[3]
        result = self._assess(observed, desired)
        self._assessed = (observed, desired, dict(self._refused), result)
        return result

    def _assess(self, observed: SysctlObserved, desired: SysctlDesired) -> Assessment:
        result = Assessment({})
        for key, value in desired.wanted:
            if _FORWARDING.fullmatch(key) and observed.forwarders:
                result.left[key] = f"something forwards here: {', '.join(observed.forwarders)}"
            elif _RA.fullmatch(key) and observed.ra_route:
                result.left[key] = f"the IPv6 default route (via {observed.ra_route}) came from a router advertisement"
            elif _RP_FILTER.fullmatch(key) and value == "1" and len(observed.ipv4_defaults) > 1:
                devices = ", ".join(observed.ipv4_defaults)
                result.loosened[key] = f"kept loose (2), not strict (1): several IPv4 default routes ({devices})"
                result.kept[key] = "2"
            else:
                result.kept[key] = value
        lines = []
        for key, value in result.kept.items():
            live = observed.live.get(key) or sysctl.Live(None, False, sysctl.MISSING, missing=True)
            if not live.missing or not observed.proc_sys:
                lines.append(f"{key} = {value}\n")
            if live.value is None or live.value == value or not live.writable:
                continue
            if self._refused.get(key, ("", ""))[0] != value:
                result.live_fixes.append((key, value, live.value))
        result.file_text = HEADER + "".join(lines)
        result.overrides = sysctl_files.overrides(list(observed.files), result.kept)
        return result

    def diff(self, observed: SysctlObserved, desired: SysctlDesired) -> Drift | None:
        found = self.assess(observed, desired)
        items: list[DriftItem] = []
        proc = self.root.system_name(self.root.proc_sys)
        for key, why in {**found.left, **found.loosened}.items():
            where = f"{proc}/{key.replace('.', '/')}"
            items.append(
                DriftItem(key, where, dict(desired.wanted)[key], "not kept as configured", kind=WARNING, advice=why)
            )
        fixing = {key for key, _, _ in found.live_fixes}
        for key, value in found.kept.items():
            live = observed.live.get(key) or sysctl.Live(None, False, sysctl.MISSING, missing=True)
            where = f"{proc}/{key.replace('.', '/')}"
            if key in fixing:
                items.append(DriftItem(key, where, value, live.value or ""))
            elif not observed.proc_sys:
                continue  # one warning below
            elif live.value is None:
                actual = "missing" if live.missing else "unreadable"
                items.append(DriftItem(key, where, value, actual, kind=WARNING, advice=live.problem or ""))
            elif live.value != value and not live.writable:
                items.append(DriftItem(key, where, value, live.value, kind=WARNING, advice=live.problem or ""))
            elif live.value != value:
                refused = self._refused[key][1]
                items.append(
                    DriftItem(key, where, value, live.value, kind=WARNING, advice=f"the kernel refused: {refused}")
                )
        if not observed.proc_sys:
            advice = "no live values to keep (a fake root without one): only the files are kept"
            items.append(DriftItem("live values", proc, "present", "missing", kind=WARNING, advice=advice))
        own_path = self.root.system_name(self.root.sysctl_dropin)
        current = (observed.own or b"").decode("utf-8", "replace")
        if observed.own_problem or current != found.file_text:
            actual = observed.own_problem or ("missing" if observed.own is None else "changed")
            items.append(DriftItem("file", own_path, "the agent's settings", actual))
        for assignment, key in found.overrides:
            path, line = assignment.file.system_path, assignment.line
            what = f"{assignment.key} = {assignment.value}"
            if assignment.glob or assignment.file.how == sysctl_files.REPORT:
                why = "sets other keys too" if assignment.glob else "the agent does not edit it"
                advice = f"{why}: comment it out, or move the setting before {self.root.sysctl_dropin.name}"
                kind = WARNING if assignment.glob else FINDING
                items.append(DriftItem(key, path, found.kept[key], f"overridden at boot by {what}", line, kind, advice))
            else:
                items.append(DriftItem(key, path, found.kept[key], assignment.value, line))
        if not items:
            return None
        # what is fixed first: the events' file.path names the first item's place
        items.sort(key=lambda item: item.kind != FIX)
        return Drift(self.name, tuple(items), self._diff_text(observed, found, current))

    def _diff_text(self, observed: SysctlObserved, found: Assessment, current: str) -> str:
        before = "".join(f"{key} = {observed.live[key].value}\n" for key, _, _ in found.live_fixes)
        after = "".join(f"{key} = {value}\n" for key, value, _ in found.live_fixes)
        text = unified(before, after, self.root.system_name(self.root.proc_sys)) if before else ""
        if current != found.file_text:
            text += unified(current, found.file_text, self.root.system_name(self.root.sysctl_dropin))
        return text

    # plan ---------------------------------------------------------------------------------------------

    def plan(self, observed: SysctlObserved, desired: SysctlDesired, drift: Drift) -> Changes:
        found = self.assess(observed, desired)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        files: list[FileChange] = []
        notes: list[str] = []
        diffs = [self._diff_text(observed, found, (observed.own or b"").decode("utf-8", "replace"))]
        if observed.own_problem or observed.own != found.file_text.encode():
            own_path = self.root.system_name(self.root.sysctl_dropin)
            files.append(FileChange(self.root.sysctl_dropin, own_path, found.file_text.encode(), 0o644, "drop-in"))
            notes.append(f"write {own_path}")
        edits: dict[str, tuple[sysctl_files.BootFile, dict[int, str]]] = {}
        for assignment, key in found.overrides:
            if assignment.glob or assignment.file.how == sysctl_files.REPORT:
                continue
            entry = edits.setdefault(assignment.file.system_path, (assignment.file, {}))
            entry[1][assignment.line] = f"{key} = {found.kept[key]}"
            notes.append(
                f"comment out {assignment.file.system_path}:{assignment.line} ({assignment.key} = {assignment.value})"
            )
        for system_path, (boot_file, lines) in edits.items():
            target = system_path if boot_file.how == sysctl_files.EDIT else None
            if target is None:
                target = self.root.system_name(self.root.sysctl_dirs[0] / boot_file.name)
                notes.append(f"mask {system_path} with {target}")
            after = sysctl_files.neutralised(boot_file, lines, stamp)
            if self.root.path(target).is_symlink():
                raise fs.UnsafeFile(self.root.path(target), "is a symlink; the agent does not edit through links")
            files.append(FileChange(self.root.path(target), target, after, None, "neutralise"))
            before = boot_file.data.decode("utf-8", "replace") if target == system_path else ""
            diffs.append(unified(before, after.decode("utf-8", "replace"), target))
        notes += [f"set {key} = {value} (was {was})" for key, value, was in found.live_fixes]
        live = tuple((key, value) for key, value, _ in found.live_fixes)
        return Changes(tuple(files), tuple(notes), "".join(diffs), reload=ReloadPlan(live=live))

    def preconditions(self, observed: SysctlObserved, desired: SysctlDesired) -> None:
        # no setting here takes a way in away: the conditions leave the risky keys alone instead
        return None

    def validate(self, changes: Changes) -> None:
        return None

    def reload(self, changes: Changes) -> ReloadOutcome:
        """Write the planned live values, as `sysctl -w` would (a rollback's reload has none); a value the
        kernel refuses or does not keep is remembered and reported (a warning), never retried until the
        config asks for another."""
        done, refused = [], []
        for key, value in changes.reload.live:
            try:
                sysctl.write(self.root, key, value)
            except OSError as exc:
                why = _NOT_PERMITTED if exc.errno in (errno.EPERM, errno.EACCES) else exc.strerror or str(exc)
                self._refused[key] = (value, why)
                refused.append(f"{key} ({exc.strerror or exc})")
                continue
            kept = sysctl.read(self.root, key).value
            if kept != value:
                self._refused[key] = (value, f"it keeps {kept}")
                refused.append(f"{key} (keeps {kept})")
            else:
                self._refused.pop(key, None)
                done.append(key)
        detail = f"{len(done)} live value(s) set" + (
            f"; refused by the kernel: {', '.join(refused)}" if refused else ""
        )
        return ReloadOutcome(True, detail)

    def facts(self, observed: SysctlObserved, desired: SysctlDesired) -> dict[str, Any]:
        found = self.assess(observed, desired)
        live = [observed.live.get(key) for key in found.kept]
        kept = sum(1 for key, value in found.kept.items() if observed.live[key].value == value)
        facts: dict[str, Any] = {"keys": len(found.kept), "live_as_kept": kept}
        unsettable = sum(1 for item in live if item is not None and not item.writable)
        if unsettable:
            facts["not_settable_here"] = unsettable
        if found.left:
            facts["left_alone"] = ", ".join(found.left)
        return facts
