#!/bin/bash
# The newcomer's first command (`make demo`, the first line of the README; `make sandbox` is the heavier
# demo on a booted VPS): a fake root with Debian 12's stock sshd_config, the real vps-agent daemon
# guarding it, its status, a tamper (`PermitRootLogin yes` planted with sed -i), the heal, and the
# daemon stopped again. Needs root: the daemon binds DIR/etc/ssh over /etc/ssh inside its own private
# mount namespace so the real sshd -T/-t see the fake root, and runs in a network namespace of its own
# (unshare --net), so the firewall guard keeps that namespace's firewall; the host is not touched. No
# network, nothing installed: it uses Debian's sshd, iptables, fail2ban-client and python3-* modules
# (`sudo make deps` installs them). Exit status: that of the last `vps-agentctl status`.
#
#   sudo bench/demo.sh DIR        (DIR must not exist, be empty, or be an earlier demo root)

set -euo pipefail

usage() { echo "usage: $0 DIR   (a new or empty directory for the fake root)" >&2; exit 2; }
[ $# -eq 1 ] && [ -n "$1" ] || usage

PY=${PYTHON:-/usr/bin/python3}  # Debian's interpreter with python3-structlog/-watchdog/-psutil/-yaml
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"  # so `-m agent...` and `-m tests.fakeroot` import from this checkout

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: needs root (the daemon makes a private mount namespace for the fake root); try: sudo make demo" >&2
    exit 2
fi

mkdir -p "$1"
DIR=$(cd "$1" && pwd)
MARKER="$DIR/.vps-agent-demo"
SOCK="$DIR/run/vps-agent/agent.sock"
CONFIG="$DIR/etc/ssh/sshd_config"

ctl() { "$PY" -m agent.cli --root "$DIR" "$@"; }
if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD= PLAIN=; fi
say() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$PLAIN"; }

# An earlier demo root is rebuilt from scratch; anything else that is not empty is left alone.
if [ -e "$MARKER" ]; then
    if [ -S "$SOCK" ] && ctl status >/dev/null 2>&1; then
        echo "demo: a vps-agent daemon is still guarding $DIR; stop it first" >&2
        exit 2
    fi
    rm -rf --one-file-system -- "$DIR"
    mkdir -p "$DIR"
elif [ -n "$(ls -A "$DIR")" ]; then
    echo "demo: $DIR is not empty and is not an earlier demo root; pick a new directory" >&2
    exit 2
fi

say "building a fake root at $DIR (Debian 12's stock sshd_config, a sudo user 'admin' with a key)"
"$PY" -m tests.fakeroot "$DIR"
touch "$MARKER"

# The EXIT trap may run while a command's output is redirected (e.g. to /dev/null): it reports on
# saved copies of stdout and stderr (fds 3 and 4), which the daemon does not inherit.
exec 3>&1 4>&2
PID=
stop_daemon() {
    local status=$?
    trap - EXIT INT TERM HUP
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        printf '\n==> stopping the daemon (pid %s)\n' "$PID" >&3
        kill -TERM "$PID" 2>/dev/null || true
        for _ in $(seq 100); do  # up to 10 s for a clean exit
            kill -0 "$PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$PID" 2>/dev/null; then
            echo "demo: the daemon did not exit within 10 s of SIGTERM; killing it" >&4
            kill -KILL "$PID" 2>/dev/null || true
            status=1
        fi
        wait "$PID" 2>/dev/null || true
    fi
    exit "$status"
}
trap stop_daemon EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# In a network namespace of its own: with --root the firewall guard refuses the host's (it would be
# `blocked`); here it builds and heals a firewall nobody else uses. The socket is a path, so
# vps-agentctl reaches it from the host's namespace.
say "starting the daemon: unshare --net $PY -m agent.daemon run --root $DIR   (log: $DIR/agent.log)"
unshare --net "$PY" -m agent.daemon run --root "$DIR" >"$DIR/agent.log" 2>&1 3>&- 4>&- &
PID=$!

# Ready = the socket answers and the start-up reconcile has run (status no longer says "starting").
ready=
for _ in $(seq 300); do  # up to 30 s
    if ! kill -0 "$PID" 2>/dev/null; then
        echo "demo: the daemon exited; its log:" >&2
        cat "$DIR/agent.log" >&2
        exit 1
    fi
    if [ -S "$SOCK" ]; then
        code=0
        ctl status --json >/dev/null 2>&1 || code=$?
        if [ "$code" -eq 0 ] || [ "$code" -eq 2 ]; then ready=1; break; fi
    fi
    sleep 0.1
done
if [ -z "$ready" ]; then
    echo "demo: the daemon did not become ready within 30 s; its log:" >&2
    tail -n 40 "$DIR/agent.log" >&2
    exit 1
fi

say "vps-agentctl --root $DIR status   (the start-up reconcile hardened the stock config)"
ctl status || true

say "tampering: sed -i '1i PermitRootLogin yes' $CONFIG"
echo "    (above the Include line, so it would really win over the agent's drop-in: root login opened)"
before=$(grep -c '"drift-reverted"' "$DIR/var/log/vps-agent/events.jsonl" 2>/dev/null || true)
sed -i '1i PermitRootLogin yes' "$CONFIG"

# Wait a moment: until the heal is reported (normally tens of milliseconds), at most 10 s.
for _ in $(seq 100); do
    now=$(grep -c '"drift-reverted"' "$DIR/var/log/vps-agent/events.jsonl" 2>/dev/null || true)
    [ "${now:-0}" -gt "${before:-0}" ] && break
    sleep 0.1
done

say "vps-agentctl --root $DIR events -n 5"
ctl events -n 5 || true

say "what is left of the tamper in $CONFIG"
grep -n 'PermitRootLogin yes' "$CONFIG" || echo "    (no PermitRootLogin yes line left)"

say "vps-agentctl --root $DIR status"
code=0
ctl status || code=$?

echo
echo "The fake root stays at $DIR (make demo-clean removes it)."
exit "$code"
