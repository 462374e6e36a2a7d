"""The firewall guard: a default-deny INPUT for IPv4 and IPv6 that never cuts SSH.

The agent owns one chain per family (`vps-agent-input` in filter), the jump from INPUT into it and
INPUT's policy; others' chains and rules (fail2ban's f2b-*, Docker's, a user's) are never touched and
never count as drift. Truth is `iptables-save`, compared with what iptables-save printed right after
the agent applied the same ruleset (its canonical form, learned from the tool, never guessed).

Native nftables (nft without iptables): the agent owns `table inet vps_agent` and nothing else; its
base chain `input` (hook input, priority filter, policy drop) holds the same policy. Every base chain
on the input hook, in every table, sees every packet, and a packet is delivered only if NONE of them
drops it: an accept in one table is final only for that chain. So others' tables keep working as
they are (fail2ban's f2b-table at a lower priority still bans first; Docker's drops still drop), but
an accept in someone else's table does not open a port our drop closes: that takes
firewall.allow_tcp/allow_udp. Truth is `nft list table inet vps_agent`, compared with the text nft
printed right after the agent applied the same table (learned, like iptables-save's form).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from agent.config import Config, FirewallConfig, format_duration
from agent.controls.base import (
    Blocked,
    Changes,
    CommandChange,
    Control,
    Drift,
    DriftItem,
    FileChange,
    Invocation,
    Lesson,
    Meta,
    NetlinkGroup,
    ObserveError,
    ReloadOutcome,
    SshPorts,
    WatchSpec,
    unified,
)
from agent.controls.firewall import others
from agent.controls.firewall.exposure import WouldCut, read_would_cut, report_note
from agent.controls.firewall.rules import (
    CHAIN,
    ESTABLISHED,
    JUMP,
    NFT_ESTABLISHED,
    NFT_NAME,
    POLICY,
    FirewallDesired,
    FirewallObserved,
    NftObserved,
    jump_position,
    lines_text,
    nft_script,
    nft_table_lines,
    open_ports,
    owned_text,
    parse_filter,
    render_nft,
    render_rules,
    restore_input,
    undo_input,
)
from agent.paths import SystemRoot
from agent.system import fs, netfilter
from agent.system.netfilter import FAMILIES, NFT_TABLE, Backend
from agent.system.run import concurrently


class FirewallControl(Control[FirewallObserved, FirewallDesired]):
    name = "firewall"

    def __init__(
        self,
        root: SystemRoot,
        in_host_netns: Callable[[], bool] = netfilter.in_host_network_namespace,
        would_cut: Callable[[FirewallConfig, tuple[int, ...]], tuple[WouldCut, ...]] = read_would_cut,
    ) -> None:
        super().__init__(root)
        self._in_host_netns = in_host_netns
        self._backend: Backend | None = None
        self._would_cut = would_cut  # in report mode: the listeners enforcing would cut off (exposure.py)

    def meta(self, config: Config) -> Meta:
        return Meta.of(config.firewall)

    def watches(self, config: Config) -> Sequence[WatchSpec]:
        return ()

    def netlink_groups(self, config: Config) -> Sequence[NetlinkGroup]:
        return (NetlinkGroup(netfilter.NETLINK_NETFILTER, netfilter.NFNLGRP_NFTABLES),)

    def poll_interval(self, config: Config) -> float | None:
        # iptables-legacy announces nothing over netlink: look this often instead; in report mode, a new
        # listener (sockets announce nothing either) is named in status within 10 s
        legacy = config.firewall.poll_interval if self.backend.name == "legacy" else None
        return min(legacy or 10.0, 10.0) if config.firewall.mode == "report" else legacy

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = netfilter.detect_backend()
        return self._backend

    # observe ------------------------------------------------------------------------------------------

    def observe(self, desired: FirewallDesired) -> FirewallObserved:
        backend = self.backend
        if backend.name == "nftables":
            result = netfilter.nft_list_table()
            if result.ok:
                lines = tuple(line.strip() for line in result.stdout.splitlines() if line.strip())
                nft = NftObserved(lines)
            elif netfilter.nft_table_missing(result):
                nft = NftObserved(None)
            else:
                raise ObserveError(f"{' '.join(result.argv)}: {result.error_text()}")
            return FirewallObserved(backend, (), "", nft)
        if not backend.iptables:
            raise ObserveError("neither iptables nor nft is installed (apt-get install iptables, or nftables)")
        families = []
        saved = concurrently([functools.partial(netfilter.save_filter, backend, family) for family in FAMILIES])
        for family, result in zip(FAMILIES, saved, strict=True):
            if not result.ok:
                raise ObserveError(f"{' '.join(result.argv)}: {result.error_text()}")
            families.append(parse_filter(family, result.stdout))
        split, leftover = others.split_rules(backend), others.leftover_nft()
        return FirewallObserved(backend, tuple(families), split, leftover_nft=leftover)

    # desired ------------------------------------------------------------------------------------------

    def desired(self, config: Config, ssh: SshPorts) -> FirewallDesired:
        ports, fw = ssh.ports, config.firewall
        rules = {family: render_rules(family, ports, fw.allow_tcp, fw.allow_udp) for family in FAMILIES}
        open_tcp = {family: open_ports(rules[family]) for family in FAMILIES}
        nft_rules = render_nft(ports, fw.allow_tcp, fw.allow_udp)
        made = FirewallDesired(rules, ports, open_tcp, fw.mode, nft_rules, ssh.listening, fw)
        return dataclasses.replace(made, learned=self._learned(made))

    # canonical form -----------------------------------------------------------------------------------

    def _keys(self, desired: FirewallDesired) -> dict[str, str]:
        """Where the store keeps each spelling: the tool's version, the family and a digest of our rules."""
        rules = {**desired.rules, "inet": desired.nft_rules}
        return {
            where: f"{self.backend.version} {where} {hashlib.sha256(chr(10).join(r).encode()).hexdigest()[:24]}"
            for where, r in rules.items()
        }

    def _learned(self, desired: FirewallDesired) -> dict[str, tuple[str, ...]]:
        try:
            kept = fs.read_regular(self.root.firewall_canonical)
            data = json.loads(kept) if kept else None
        except (OSError, ValueError, fs.UnsafeFile):
            data = None
        if not isinstance(data, dict):
            return {}  # nothing learned yet (or a store the agent rewrites at its next heal)
        store = data
        found = {where: store.get(key) for where, key in self._keys(desired).items()}
        return {where: tuple(lines) for where, lines in found.items() if isinstance(lines, list)}

    def expected_chain(self, family: str, desired: FirewallDesired) -> tuple[str, ...]:
        """The chain as iptables-save prints it, once learned; until then, as the agent writes it
        (which differs, so the first converge re-applies the same ruleset once and learns)."""
        return desired.learned.get(family, desired.rules[family])

    def expected_nft(self, desired: FirewallDesired) -> tuple[str, ...]:
        """Our table as `nft list table` prints it, once learned; until then as the agent writes it."""
        return desired.learned.get("inet", nft_table_lines(desired.nft_rules))

    def learned(self, after: FirewallObserved, desired: FirewallDesired) -> Lesson[FirewallDesired] | None:
        """How the tool printed the ruleset just applied, for the transaction to keep: only right after our own
        atomic apply, and only when nothing else slipped in (as many rules as the agent wrote)."""
        seen: dict[str, tuple[tuple[str, ...] | None, tuple[str, ...]]]
        if after.nft is not None:
            ours = {"inet": desired.nft_rules}
            seen = {"inet": (after.nft.lines, after.nft.rules)}
        else:
            ours = {family: desired.rules[family] for family in FAMILIES}
            seen = {f: (after.family(f).chain, after.family(f).chain or ()) for f in FAMILIES}
        learned = {
            where: desired.learned.get(where)
            or (lines if lines is not None and len(rules) == len(ours[where]) else None)
            for where, (lines, rules) in seen.items()
        }
        if all(desired.learned.get(where) == lines for where, lines in learned.items()):
            return None
        keys = self._keys(desired)
        known = {where: lines for where, lines in learned.items() if lines is not None}
        store = {keys[where]: list(lines) for where, lines in known.items()}
        path = self.root.firewall_canonical
        keep = FileChange(path, self.root.system_name(path), json.dumps(store, indent=1).encode(), 0o644, "learned")
        return Lesson(dataclasses.replace(desired, learned=known), keep)

    # diff ---------------------------------------------------------------------------------------------

    def _diff_nft(self, seen: NftObserved, desired: FirewallDesired) -> Drift | None:
        want = self.expected_nft(desired)
        if seen.lines == want:
            return None
        items = []
        if seen.lines is None:
            items.append(DriftItem(f"table {NFT_NAME}", "nftables", "present", "missing"))
        else:
            if seen.rules != want[3:-2] or len(seen.lines) != len(want):
                items.append(
                    DriftItem(
                        f"table {NFT_NAME}",
                        "nftables",
                        f"{len(desired.nft_rules)} agent rules",
                        f"{len(seen.rules)} rules, changed",
                    )
                )
            if seen.policy != POLICY:
                items.append(DriftItem("policy", f"nftables {NFT_NAME} input", POLICY, seen.policy))
            if not items:
                items.append(DriftItem(f"table {NFT_NAME}", "nftables", "as the agent wrote it", "changed"))
        text = unified(lines_text(seen.lines or ()), lines_text(want), f"/nftables/{NFT_TABLE[1]}")
        return Drift(self.name, tuple(items), text)

    def diff(self, observed: FirewallObserved, desired: FirewallDesired) -> Drift | None:
        if observed.nft is not None:
            return self._diff_nft(observed.nft, desired)
        items: list[DriftItem] = []
        diffs: list[str] = []
        for family in FAMILIES:
            seen = observed.family(family)
            where = f"{family} filter"
            want = self.expected_chain(family, desired)
            if seen.chain is None:
                items.append(DriftItem(f"chain {CHAIN}", where, "present", "missing"))
            elif seen.chain != want:
                items.append(
                    DriftItem(f"chain {CHAIN}", where, f"{len(want)} agent rules", f"{len(seen.chain)} rules, changed")
                )
            if seen.chain != want or not seen.jumps or seen.policy != POLICY:
                diffs.append(
                    unified(
                        owned_text(seen.policy, seen.jumps > 0, seen.chain or ()),
                        owned_text(POLICY, True, want),
                        f"/{family}/filter",
                    )
                )
            if seen.jumps == 0:
                items.append(DriftItem("jump", f"{where} INPUT", JUMP, "missing"))
            if seen.policy != POLICY:
                items.append(DriftItem("policy", f"{where} INPUT", POLICY, seen.policy))
        if observed.leftover_nft is not None:
            wanted = f"absent (the agent keeps iptables-{observed.backend.name})"
            items.append(DriftItem(f"table {NFT_NAME}", "nftables", wanted, "left from native nftables, policy drop"))
            diffs.append(unified("\n".join(observed.leftover_nft) + "\n", "", f"/nftables/{NFT_NAME}"))
        if not items:
            return None
        return Drift(self.name, tuple(items), "".join(diffs))

    # plan ---------------------------------------------------------------------------------------------

    def plan(self, observed: FirewallObserved, desired: FirewallDesired, drift: Drift) -> Changes:
        if observed.nft is not None:
            table = nft_table_lines(desired.nft_rules)
            change = CommandChange(
                apply=Invocation(netfilter.nft_apply_argv(), nft_script(table)),
                undo=Invocation(netfilter.nft_apply_argv(), nft_script(observed.nft.lines)),
                check=Invocation(netfilter.nft_apply_argv(check=True), nft_script(table)),
                reason=f"table {NFT_NAME}",
            )
            note = (
                f"nftables: table {NFT_NAME} re-created in one transaction, {len(desired.nft_rules)} rules, policy drop"
            )
            return Changes(notes=(note,), diff=drift.diff, commands=(change,))
        commands: list[CommandChange] = []
        notes: list[str] = []
        for family in FAMILIES:
            seen = observed.family(family)
            want = self.expected_chain(family, desired)
            if seen.chain == want and seen.jumps and seen.policy == POLICY:
                continue
            apply = restore_input(desired.rules[family], POLICY, jump_position(seen) if not seen.jumps else None)
            commands.append(
                CommandChange(
                    apply=Invocation(netfilter.restore_argv(self.backend, family), apply),
                    undo=Invocation(netfilter.restore_argv(self.backend, family), undo_input(seen)),
                    check=Invocation(netfilter.restore_argv(self.backend, family, test=True), apply),
                    reason=f"{family} {CHAIN}",
                )
            )
            notes.append(
                f"{family}: {len(desired.rules[family])} rules in {CHAIN}, INPUT policy {POLICY}"
                + ("" if seen.jumps else ", jump restored")
            )
        if observed.leftover_nft is not None:  # removing a table that drops can only open, never cut
            commands.append(
                CommandChange(
                    apply=Invocation(netfilter.nft_apply_argv(), nft_script(None)),
                    undo=Invocation(netfilter.nft_apply_argv(), nft_script(observed.leftover_nft)),
                    check=Invocation(netfilter.nft_apply_argv(check=True), nft_script(None)),
                    reason=f"leftover table {NFT_NAME}",
                )
            )
            notes.append(
                f"nftables: the leftover table {NFT_NAME} removed (the agent keeps iptables-{self.backend.name})"
            )
        return Changes(notes=tuple(notes), diff=drift.diff, commands=tuple(commands))

    # preconditions ------------------------------------------------------------------------------------

    def preconditions(self, observed: FirewallObserved, desired: FirewallDesired) -> Blocked | None:
        """Never cut SSH: every port a running sshd listens on, and established connections, stay open."""
        reasons: list[str] = []
        if not self.root.is_host and self._in_host_netns():
            reasons.append(
                f"--root {self.root.prefix} is a fake root but the agent is in the host's network namespace: "
                "it will not change this machine's firewall (run it under `unshare --net`)"
            )
        listening = desired.sshd_listening
        for family in FAMILIES:
            missing = sorted(p for p in listening if p not in desired.open_tcp[family])
            if missing:
                reasons.append(f"{family}: the ruleset would not accept sshd's port(s) {missing}")
            if ESTABLISHED not in desired.rules[family]:
                reasons.append(f"{family}: the ruleset would not accept established connections")
        if observed.nft is not None and NFT_ESTABLISHED not in desired.nft_rules:
            reasons.append(f"nftables: table {NFT_NAME} would not accept established connections")
        return Blocked(tuple(reasons)) if reasons else None

    # validate / reload --------------------------------------------------------------------------------

    def validate(self, changes: Changes) -> None:
        """The rulesets are live once applied (`iptables-restore --test` ran before, as each command's check):
        the transaction's observe-again looks at them, and learned() keeps how the tool printed them."""
        return None

    def reload(self, changes: Changes) -> ReloadOutcome:
        return ReloadOutcome(True, "the kernel applies a restored ruleset at once")

    def facts(self, observed: FirewallObserved, desired: FirewallDesired) -> dict[str, Any]:
        facts = self._ruleset_facts(observed, desired)
        if desired.mode == "report":
            facts["would_cut"] = [cut.as_fact() for cut in self._would_cut(desired.config, desired.ssh_ports)]
        return facts

    def report_note(self, facts: dict[str, Any]) -> str:  # what enforcing would cut off, and the command
        cuts = facts.get("would_cut")
        return "" if cuts is None else report_note(WouldCut(**cut) for cut in cuts)

    def _ruleset_facts(self, observed: FirewallObserved, desired: FirewallDesired) -> dict[str, Any]:
        if observed.nft is not None:
            rules = observed.nft.rules
            accepted = [p for p in desired.ssh_ports if f"tcp dport {p} accept" in rules]
            return {
                "backend": "nftables",
                "table": NFT_NAME,
                "policy": observed.nft.policy,
                "rules": len(rules),
                "ssh_ports_accepted": ",".join(map(str, accepted)) or "none",
                "mode": desired.mode,
            }
        facts: dict[str, Any] = {"backend": f"iptables-{observed.backend.name}"}
        for family in FAMILIES:
            seen = observed.family(family)
            facts[f"{family}_policy"] = seen.policy
            facts[f"{family}_rules"] = len(seen.chain or ())
        accepted = [p for p in desired.ssh_ports if all(p in open_ports(f.chain or ()) for f in observed.families)]
        facts["ssh_ports_accepted"] = ",".join(map(str, accepted)) or "none"
        facts["mode"] = desired.mode
        if observed.backend.name == "legacy":
            every = format_duration(desired.config.poll_interval)
            facts["detection"] = f"polling every {every} (iptables-legacy sends no netlink events)"
        if observed.split:
            facts["warning"] = observed.split
        return facts
