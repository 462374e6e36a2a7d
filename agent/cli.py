"""vps-agentctl: the admin's console. Exit codes: 0 compliant, 1 drift or non-compliant, 2 blocked or
error, 3 daemon unreachable."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import Config, ConfigError, load_config, parse_duration
from agent.controls.base import Control
from agent.engine import transaction as tx
from agent.engine.runner import DISABLED, FLAPPING, PAUSED, STARTING, WAITING
from agent.events import null_events
from agent.ipc import DaemonUnreachable, IpcClient, IpcError
from agent.paths import SystemRoot
from agent.system import fs, namespace
from agent.system.run import concurrently

EXIT_OK, EXIT_DRIFT, EXIT_ERROR, EXIT_UNREACHABLE = 0, 1, 2, 3
_ERROR_STATUSES = {tx.BLOCKED, tx.FAILED, tx.ERROR}
_DRIFT_STATUSES = {tx.DRIFTED, tx.PENDING, FLAPPING, STARTING, WAITING}


def exit_code_for(controls: Iterable[dict[str, Any]]) -> int:
    code = EXIT_OK
    for item in controls:
        status = item["status"]
        if status in _ERROR_STATUSES:
            return EXIT_ERROR
        if status in _DRIFT_STATUSES or (status == PAUSED and item.get("drift")):
            code = EXIT_DRIFT
    return code


def _ago(stamp: float | None) -> str:
    if not stamp:
        return "-"
    seconds = max(0, int(time.time() - stamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _facts_text(facts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in facts.items())


def render_table(controls: Sequence[dict[str, Any]]) -> str:
    rows = [("CONTROL", "STATUS", "SINCE", "DETAIL")]
    for item in controls:
        detail = item.get("why") or _facts_text(item.get("facts", {}))
        if item["status"] == tx.HEALED and item.get("last_heal_at"):
            detail = f"last heal {_ago(item['last_heal_at'])}: {detail}"
        rows.append((item["control"], item["status"], _ago(item.get("since")), detail))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows]
    for item in controls:
        for held in item.get("held") or []:
            lines.append(f"  {item['control']}: {held['setting']} held: {held['reason']}: {held['unblock']}")
        for drift in item.get("drift") or []:
            if item["status"] not in (tx.COMPLIANT, tx.HEALED):
                lines.append(f"  {item['control']}: {drift}")
    return "\n".join(lines)


def render_outputs(outputs: dict[str, Any]) -> list[str]:
    """Where events and metrics go, and what is failing or being dropped on the way."""
    journal = {"native": "the journal (native fields)", "stdout": "stdout (JSON lines)", "off": "not to stdout"}
    lines = [f"events: {journal.get(outputs.get('journald', ''), '?')}, {outputs.get('events_file') or 'no file'}"]
    if outputs.get("journald_note"):
        lines.append(f"  journal: {outputs['journald_note']}")
    syslog = outputs.get("syslog")
    if syslog:
        if syslog["connected"]:
            state = "connected"
        elif syslog["error_since"]:
            state = f"unreachable since {_ago(syslog['error_since'])}"
        else:
            state = "connecting"
        lines.append(
            f"syslog {syslog['target']}: {state}, {syslog['sent']} sent, {syslog['dropped']} dropped, "
            f"{syslog['buffered']}/{syslog['buffer']} buffered" + (f" ({syslog['error']})" if syslog["error"] else "")
        )
    metrics = outputs.get("prometheus_textfile")
    if metrics:
        if metrics.get("error"):
            lines.append(f"metrics NOT written: {metrics['error']}")
        elif metrics.get("note"):
            lines.append(f"metrics {metrics['note']}")
        else:
            lines.append(f"metrics: {metrics['path']}, written {_ago(metrics['written_at'])}")
    if outputs.get("output_error"):
        lines.append(f"an output failed: {outputs['output_error']}")
    return lines


def _client(args: argparse.Namespace, timeout: float = 10.0) -> IpcClient:
    return IpcClient(Path(args.socket) if args.socket else SystemRoot.at(args.root).socket, timeout)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


# verbs that talk to the daemon ---------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    status = _client(args).call("status")
    # a port move in flight (or rolled back) is not yet the configured baseline: 1, like drift
    code = exit_code_for(status["controls"])
    if status.get("port_move") and code == EXIT_OK:
        code = EXIT_DRIFT
    if args.json:
        _print_json(status)
        return code
    print(
        f"vps-agent {status['version']} on {status['host']} (pid {status['pid']}), "
        f"up since {_ago(status['started_at'])}"
    )
    if status["config"]["error"]:
        print(f"config REJECTED, running on the previous one: {status['config']['error']}")
    if status.get("events_file_error"):
        print(f"events file not written: {status['events_file_error']}")
    for line in render_outputs(status.get("outputs") or {}):
        print(line)
    print(render_table(status["controls"]))
    if status.get("port_move"):
        print(render_port_move(status["port_move"]))
    if status.get("updates"):
        print(render_updates(status["updates"]))
    return code


def _when(stamp: float | None) -> str:
    """A future moment as the admin reads it: local time, and how far off."""
    if not stamp:
        return "-"
    left = stamp - time.time()
    local = time.strftime("%a %Y-%m-%d %H:%M %Z", time.localtime(stamp))
    if left <= 0:
        return f"{local} (due now)"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if left >= size:
            return f"{local} (in {int(left // size)}{unit})"
    return f"{local} (in {int(left)}s)"


def render_updates(updates: dict[str, Any]) -> str:
    """The upgrade scheduler's lines of `status`: last run, its outcome, the next run, reboot."""
    lines = []
    if not updates["enabled"]:
        lines.append("updates: disabled in the config")
    elif updates.get("error"):
        lines.append(f"updates: SCHEDULE ERROR: {updates['error']}")
    else:
        catch_up = " (catching up a missed run)" if updates.get("catch_up") else ""
        lines.append(
            f"updates: {updates['mode']}, {updates['schedule']}; next run {_when(updates['next_run'])}{catch_up}"
        )
    if updates.get("running_since"):
        lines.append(f"  running since {_ago(updates['running_since'])}")
    if updates.get("last_finished"):
        changes = updates.get("last_changes") or []
        text = f"{len(changes)} package(s) changed" if changes else "nothing to upgrade"
        detail = f": {updates['last_detail']}" if updates.get("last_detail") else ""
        lines.append(f"  last run {_ago(updates['last_finished'])}: {updates['last_outcome']}, {text}{detail}")
    else:
        lines.append("  last run: never")
    if updates.get("reboot_required"):
        by = ", ".join(updates.get("reboot_packages") or []) or "an upgrade"
        window = updates.get("reboot_window")
        plan = f"reboots inside {window}" if window else "reboot by hand (updates.reboot_window is null)"
        lines.append(f"  REBOOT REQUIRED by {by}: {plan}")
    return "\n".join(lines)


def render_port_move(move: dict[str, Any]) -> str:
    """The SSH port move's line of `status`."""
    olds = ", ".join(str(p) for p in move["old"])
    if move["phase"] == "open":
        left = int(move.get("seconds_left") or 0)
        return (
            f"ssh port move {olds} -> {move['new']}: BOTH OPEN; log in on {move['new']} (or run "
            f"`vps-agentctl confirm`) within {left // 60}m{left % 60:02d}s, or it rolls back to {olds}"
        )
    return (
        f"ssh port move to {move['new']} ROLLED BACK: sshd stays on {olds} (not confirmed in time); "
        "change the config and reload to try again"
    )


def cmd_confirm(args: argparse.Namespace) -> int:
    """The new SSH port works: close the old one now."""
    result = _client(args, timeout=300.0).call("confirm")
    if not result["confirmed"]:
        print(f"vps-agentctl: {result['why']}", file=sys.stderr)
        return EXIT_DRIFT
    for what in result["what"]:
        print(f"confirmed {what}")
    print(render_table(result["status"]["controls"]))
    return exit_code_for(result["status"]["controls"])


def cmd_upgrade(args: argparse.Namespace) -> int:
    """`upgrade --now` runs apt now (waiting for the outcome unless --no-wait); plain `upgrade` shows
    the scheduler's state."""
    if not args.now:
        status = _client(args).call("status")
        if args.json:
            _print_json(status["updates"])
        else:
            print(render_updates(status["updates"]))
        return EXIT_OK
    # a run is bounded by updates.time_limit (at most a day); the client waits as long
    result = _client(args, timeout=86400.0 + 300.0).call("upgrade", wait=not args.no_wait)
    if args.json:
        _print_json(result)
    if not result["started"]:
        if not args.json:
            print(f"vps-agentctl: not started: {result['why']}", file=sys.stderr)
        return EXIT_DRIFT
    if args.no_wait:
        if not args.json:
            print("upgrade started; follow it with `vps-agentctl events -f`")
        return EXIT_OK
    if not args.json:
        for change in result["changes"]:
            print(f"  {change}")
        detail = f": {result['detail']}" if result["detail"] else ""
        print(f"upgrade {result['outcome']}, {len(result['changes'])} package(s) changed{detail}")
        if result["updates"].get("reboot_required"):
            print(render_updates(result["updates"]).splitlines()[-1].strip())
    return EXIT_OK if result["outcome"] in ("success", "skipped") else EXIT_ERROR


def cmd_events(args: argparse.Namespace) -> int:
    if args.n < 0:
        print(f"vps-agentctl: -n {args.n}: expected a number of events >= 0", file=sys.stderr)
        return EXIT_ERROR
    request = {"n": args.n, "control": args.control}
    try:
        client = _client(args)
        items: Iterable[dict[str, Any]] = (
            client.stream("events", follow=True, **request) if args.follow else client.call("events", **request)
        )
        for event in items:
            _print_event(event, args.json)
    except DaemonUnreachable:
        if args.follow:
            raise
        # the daemon is down: the events file still tells the story
        return _events_from_file(args)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _events_from_file(args: argparse.Namespace) -> int:
    root = SystemRoot.at(args.root)
    try:
        config = load_config(root.config_file)
        path = root.path(config.events.file)
    except ConfigError:
        path = root.log_dir / "events.jsonl"
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        print(f"vps-agentctl: the daemon is unreachable and {path} cannot be read: {exc.strerror}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"(daemon unreachable; last events from {path})", file=sys.stderr)
    shown = []
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if args.control is None or event.get("control") == args.control:
            shown.append(event)
    for event in shown[-args.n :] if args.n > 0 else []:
        _print_event(event, args.json)
    return EXIT_OK


def _print_event(event: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(event, separators=(",", ":"), default=str), flush=True)
        return
    action = event.get("event", {}).get("action", "?")
    outcome = event.get("event", {}).get("outcome", "")
    print(
        f"{event.get('@timestamp', '')}  {event.get('control', '-'):<8} {action:<20} {outcome:<8} "
        f"{event.get('message', '')}",
        flush=True,
    )
    if event.get("diff") and action in ("drift-detected", "drift-reverted"):
        for line in str(event["diff"]).splitlines():
            print(f"    {line}")


def cmd_pause(args: argparse.Namespace) -> int:
    if args.duration is not None:
        try:
            parse_duration(args.duration)
        except ValueError:
            print(f"vps-agentctl: --for {args.duration!r}: expected a duration like 30m, 1h, 1d", file=sys.stderr)
            return EXIT_ERROR
    result = _client(args).call("pause", control=args.control, **{"for": args.duration})
    until = (
        "until `vps-agentctl resume`"
        if result["until"] is None
        else f"until {time.strftime('%H:%M:%S', time.localtime(result['until']))}"
    )
    print(f"paused {', '.join(result['paused'])} {until}: drift is reported, not reverted")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    result = _client(args).call("resume", control=args.control)
    print(f"resumed {', '.join(result['resumed'])}: converging now")
    return EXIT_OK


def cmd_converge(args: argparse.Namespace) -> int:
    # a converge waits for every control's transaction (each may take up to 2 minutes)
    result = _client(args, timeout=300.0).call("converge", control=args.control)
    controls = [c for c in result["status"]["controls"] if args.control in (None, c["control"])]
    print(render_table(controls))
    return exit_code_for(controls)


def cmd_reload(args: argparse.Namespace) -> int:
    result = _client(args).call("reload")
    if not result["ok"]:
        print(f"vps-agentctl: config rejected, the previous one stays in force:\n  {result['error']}", file=sys.stderr)
        return EXIT_ERROR
    print("config reloaded")
    return EXIT_OK


# verbs that work without the daemon ----------------------------------------------------------------------


def _local_outcomes(args: argparse.Namespace) -> tuple[Config, list[tx.Outcome]] | int:
    from agent.wiring import build_controls, transaction_context

    root = SystemRoot.at(args.root)
    try:
        config = load_config(Path(args.config) if args.config else root.config_file)
        namespace.isolate_fake_root(root)
    except (ConfigError, namespace.NamespaceError) as exc:
        print(f"vps-agentctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    ctx = transaction_context(root, config, null_events())
    controls = [c for c in build_controls(root) if args.control in (None, c.name)]
    if not controls:
        print(f"vps-agentctl: no control named {args.control!r}", file=sys.stderr)
        return EXIT_ERROR

    def outcome(control: Control) -> tx.Outcome:
        if not control.enabled(config):
            return tx.Outcome(control.name, DISABLED, "disabled in the config")
        return tx.converge(control, config, ctx, reason="check", heal=False)

    # independent, and mostly waiting for their tools (sshd -T, iptables-save, fail2ban-client -d): at once
    return config, concurrently([functools.partial(outcome, control) for control in controls])


def _outcome_row(outcome: tx.Outcome) -> dict[str, Any]:
    return {
        "control": outcome.control,
        "status": outcome.status,
        "why": outcome.detail if outcome.status != tx.COMPLIANT else "",
        "facts": outcome.facts,
        "drift": [i.describe() for i in outcome.drift.items] if outcome.drift else [],
        "blocked": list(outcome.blocked.reasons) if outcome.blocked else [],
        "held": [
            {"setting": h.setting, "reason": h.reason, "unblock": h.unblock, "needs": h.needs}
            for h in (outcome.held.settings if outcome.held else ())
        ],
        "plan": list(outcome.changes.notes) if outcome.changes else [],
        "duration_ms": outcome.duration_ms,
    }


def cmd_check(args: argparse.Namespace) -> int:
    result = _local_outcomes(args)
    if isinstance(result, int):
        return result
    rows = [_outcome_row(o) for o in result[1]]
    code = exit_code_for(rows)
    if args.json:
        _print_json({"controls": rows, "exit_code": code})
        return code
    print(render_table([{**r, "since": None} for r in rows]))
    for row in rows:
        for reason in row["blocked"]:
            print(f"  {row['control']} blocked: {reason}")
    return code


def cmd_diff(args: argparse.Namespace) -> int:
    result = _local_outcomes(args)
    if isinstance(result, int):
        return result
    code = EXIT_OK
    for outcome in result[1]:
        if outcome.status in (tx.ERROR, tx.FAILED) and outcome.drift is None:
            print(f"# {outcome.control}: cannot plan: {outcome.detail}", file=sys.stderr)
            code = EXIT_ERROR
            continue
        if outcome.held is not None:
            code = max(code, EXIT_ERROR if outcome.held.blocked else EXIT_DRIFT)
            for held in outcome.held.settings:
                print(f"# {outcome.control}: {held.describe()}")
        if outcome.drift is None:
            continue
        code = max(code, EXIT_ERROR if outcome.status in _ERROR_STATUSES else EXIT_DRIFT)
        print(f"# {outcome.control}: {outcome.drift.summary()}")
        if outcome.blocked:
            print(f"# blocked, the agent would change nothing: {outcome.blocked}")
        elif outcome.changes is not None:
            for note in outcome.changes.notes:
                print(f"# would {note}")
            sys.stdout.write(outcome.changes.diff)
    return code


def cmd_validate_config(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else SystemRoot.at(args.root).config_file
    try:
        load_config(path)
    except ConfigError as exc:
        print(f"{exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{path}: valid")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vps-agentctl",
        description="Console for vps-agent. Exit codes: 0 compliant, 1 drift or non-compliant, "
        "2 blocked or error, 3 daemon unreachable.",
    )
    parser.add_argument("--version", action="version", version=f"vps-agentctl {__version__}")
    parser.add_argument("--root", default="/", metavar="DIR", help="the system under DIR instead of / (tests, demos)")
    parser.add_argument("--socket", metavar="PATH", help="daemon socket (default: ROOT/run/vps-agent/agent.sock)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = sub.add_parser("status", help="where the machine stands, per control (from the daemon)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    for name, func, text in (
        ("check", cmd_check, "observe every control now, without the daemon; changes nothing"),
        ("diff", cmd_diff, "print what the agent would change (the dry-run plan), without the daemon"),
    ):
        verb = sub.add_parser(name, help=text)
        verb.add_argument("control", nargs="?", help="only this control (e.g. ssh)")
        verb.add_argument("--config", metavar="FILE", help="config file (default: ROOT/etc/vps-agent/config.yaml)")
        if name == "check":
            verb.add_argument("--json", action="store_true", help="machine-readable output")
        verb.set_defaults(func=func)

    events = sub.add_parser("events", help="recent events from the daemon (or its events file when it is down)")
    events.add_argument("-n", type=int, default=20, metavar="N", help="how many recent events (default 20)")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument("--json", action="store_true", help="one JSON object per line, as written to events.jsonl")
    events.add_argument("--control", metavar="NAME", help="only this control's events")
    events.set_defaults(func=cmd_events)

    pause = sub.add_parser("pause", help="stop reverting drift (it is still reported) so you can edit by hand")
    pause.add_argument("--for", dest="duration", metavar="DURATION", help="resume by itself after e.g. 30m, 1h")
    pause.add_argument("control", nargs="?", help="only this control (default: all)")
    pause.set_defaults(func=cmd_pause)

    resume = sub.add_parser("resume", help="end a pause and converge at once")
    resume.add_argument("control", nargs="?", help="only this control (default: all)")
    resume.set_defaults(func=cmd_resume)

    converge = sub.add_parser("converge", help="converge now and wait for the outcome")
    converge.add_argument("control", nargs="?", help="only this control (default: all)")
    converge.set_defaults(func=cmd_converge)

    reload = sub.add_parser("reload", help="re-read the config file (an invalid one is rejected, the old stays)")
    reload.set_defaults(func=cmd_reload)

    confirm = sub.add_parser(
        "confirm",
        help="vouch for what waits for proof: the new SSH port works (the old one closes), a sudo admin's "
        "key logs in (password logins go off)",
    )
    confirm.set_defaults(func=cmd_confirm)

    upgrade = sub.add_parser("upgrade", help="show the upgrade schedule; with --now, run apt update + upgrade now")
    upgrade.add_argument("--now", action="store_true", help="run an upgrade now and wait for its outcome")
    upgrade.add_argument("--no-wait", action="store_true", help="with --now: return once it has started")
    upgrade.add_argument("--json", action="store_true", help="machine-readable output")
    upgrade.set_defaults(func=cmd_upgrade)

    validate = sub.add_parser("validate-config", help="check a config file and exit 0 (valid) or 2")
    validate.add_argument("file", nargs="?", help="the file (default: ROOT/etc/vps-agent/config.yaml)")
    validate.set_defaults(func=cmd_validate_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DaemonUnreachable as exc:
        print(f"vps-agentctl: the daemon is unreachable: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except IpcError as exc:
        print(f"vps-agentctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except fs.UnsafeFile as exc:
        print(f"vps-agentctl: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
