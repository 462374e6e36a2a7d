"""vps-agentctl: the admin's console. Exit codes: 0 compliant, 1 drift or non-compliant, 2 blocked or
error, 3 daemon unreachable."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import ConfigError, load_config, parse_duration
from agent.console.codes import EXIT_DRIFT, EXIT_ERROR, EXIT_OK, EXIT_UNREACHABLE
from agent.console.enforce import enforce
from agent.console.events import event_lines
from agent.console.help import VERBS
from agent.console.local import local_outcomes, outcome_row
from agent.console.status import render_check, render_status, render_table, render_updates
from agent.console.text import Terminal, until
from agent.engine import transaction as tx
from agent.engine.runner import FLAPPING, PAUSED, STARTING, WAITING
from agent.ipc import DaemonUnreachable, IpcClient, IpcError
from agent.paths import SystemRoot
from agent.system import fs

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
    print(render_status(status, Terminal.of(sys.stdout, full=args.full)))
    return code


def cmd_confirm(args: argparse.Namespace) -> int:
    """The new SSH port works: close the old one now."""
    result = _client(args, timeout=300.0).call("confirm")
    if not result["confirmed"]:
        print(f"vps-agentctl: {result['why']}", file=sys.stderr)
        return EXIT_DRIFT
    for what in result["what"]:
        print(f"confirmed {what}")
    print(render_table(result["status"]["controls"], Terminal.of(sys.stdout)))
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
            _print_event(event, args)
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
        _print_event(event, args)
    return EXIT_OK


def _print_event(event: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(event, separators=(",", ":"), default=str), flush=True)
        return
    print("\n".join(event_lines(event, Terminal.of(sys.stdout), utc=args.utc, diff=args.diff)), flush=True)


def cmd_pause(args: argparse.Namespace) -> int:
    if args.duration is not None:
        try:
            parse_duration(args.duration)
        except ValueError:
            print(f"vps-agentctl: --for {args.duration!r}: expected a duration like 30m, 1h, 1d", file=sys.stderr)
            return EXIT_ERROR
    result = _client(args).call("pause", control=args.control, **{"for": args.duration})
    lasting = "until `vps-agentctl resume`" if result["until"] is None else f"until {until(result['until'])}"
    print(f"paused {', '.join(result['paused'])} {lasting}: drift is reported, not reverted")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    result = _client(args).call("resume", control=args.control)
    print(f"resumed {', '.join(result['resumed'])}: converging now")
    return EXIT_OK


def cmd_converge(args: argparse.Namespace) -> int:
    # a converge waits for every control's transaction (each may take up to 2 minutes)
    result = _client(args, timeout=300.0).call("converge", control=args.control)
    controls = [c for c in result["status"]["controls"] if args.control in (None, c["control"])]
    print(render_table(controls, Terminal.of(sys.stdout)))
    return exit_code_for(controls)


def cmd_reload(args: argparse.Namespace) -> int:
    result = _client(args).call("reload")
    if not result["ok"]:
        errors = "".join(f"\n  {line}" for line in str(result["error"]).splitlines())
        print(f"vps-agentctl: config rejected, the previous one stays in force:{errors}", file=sys.stderr)
        return EXIT_ERROR
    print("config reloaded")
    return EXIT_OK


def cmd_enforce(args: argparse.Namespace) -> int:
    return enforce(SystemRoot.at(args.root), args.yes, lambda: _client(args).call("reload"))


# verbs that work without the daemon ----------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    result = local_outcomes(args)
    if isinstance(result, int):
        return result
    rows = [outcome_row(o) for o in result[1]]
    code = exit_code_for(rows)
    if args.json:
        _print_json({"controls": rows, "exit_code": code})
        return code
    print(render_check(rows, Terminal.of(sys.stdout, full=args.full)))
    return code


def cmd_diff(args: argparse.Namespace) -> int:
    result = local_outcomes(args)
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
    verbs = {
        verb.name: sub.add_parser(
            verb.name,
            help=verb.summary,
            description=verb.wrapped_description(),
            epilog=verb.epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for verb in VERBS
    }
    controls = "ssh, firewall, fail2ban, accounts, sysctl or strict"
    full = "show every character of DETAIL (on a terminal it is trimmed to the width)"

    status = verbs["status"]
    status.add_argument("-l", "--full", action="store_true", help=full)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    for name, func in (("check", cmd_check), ("diff", cmd_diff)):
        verb = verbs[name]
        verb.add_argument("control", nargs="?", help=f"only this control: {controls}")
        verb.add_argument("--config", metavar="FILE", help="config file (default: ROOT/etc/vps-agent/config.yaml)")
        if name == "check":
            verb.add_argument("-l", "--full", action="store_true", help=full)
            verb.add_argument("--json", action="store_true", help="machine-readable output")
        verb.set_defaults(func=func)

    events = verbs["events"]
    events.add_argument("-n", type=int, default=20, metavar="N", help="how many recent events (default 20)")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument("-v", "--diff", action="store_true", help="show what each drift and heal changed")
    events.add_argument("--utc", action="store_true", help="times in UTC (default: local time)")
    events.add_argument("--json", action="store_true", help="one JSON object per line, as written to events.jsonl")
    events.add_argument("--control", metavar="NAME", help="only this control's events")
    events.set_defaults(func=cmd_events)

    pause_for = "resume by itself after e.g. 30m, 1h, 3d"
    verbs["pause"].add_argument("--for", dest="duration", metavar="DURATION", help=pause_for)
    for name, func in (("pause", cmd_pause), ("resume", cmd_resume), ("converge", cmd_converge)):
        verbs[name].add_argument("control", nargs="?", help=f"only this control: {controls} (default: all)")
        verbs[name].set_defaults(func=func)
    verbs["reload"].set_defaults(func=cmd_reload)
    enforce = verbs["enforce"]
    enforce.add_argument("--yes", action="store_true", help="enforce even though listeners would be cut off")
    enforce.set_defaults(func=cmd_enforce)
    verbs["confirm"].set_defaults(func=cmd_confirm)

    upgrade = verbs["upgrade"]
    upgrade.add_argument("--now", action="store_true", help="run an upgrade now and wait for its outcome")
    upgrade.add_argument("--no-wait", action="store_true", help="with --now: return once it has started")
    upgrade.add_argument("--json", action="store_true", help="machine-readable output")
    upgrade.set_defaults(func=cmd_upgrade)

    validate = verbs["validate-config"]
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
