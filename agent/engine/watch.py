"""inotify watches on parent directories (so rename-over saves by vim, sed -i, Ansible are seen)."""

from __future__ import annotations

import inspect
import os
import select
import socket
import threading
from collections.abc import Callable, Iterable

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from agent.controls.base import NetlinkGroup, WatchSpec
from agent.system.fs import EchoFilter
from agent.system.netfilter import netlink_subscribe

Trigger = Callable[[str], None]

# What counts as a change: an entry made, removed or renamed, a file's content or metadata (mode, owner:
# IN_MODIFY, IN_ATTRIB). Never an open or a close without a write (watchdog 5+, Debian 13's 6.0, reports
# those): sshd -T and the agent's own observe read every watched file, and each converge would cause the next.
CHANGES = frozenset({"created", "deleted", "modified", "moved"})
# watchdog 4+ takes the event classes wanted at schedule() and asks inotify for those alone (no wake-up for
# a read at all); 2.2.1 (Debian 12) has no such parameter and never reports opens: CHANGES filters both.
_EVENT_FILTER = (
    {
        "event_filter": [
            FileCreatedEvent,
            DirCreatedEvent,
            FileDeletedEvent,
            DirDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
            DirMovedEvent,
        ]
    }
    if "event_filter" in inspect.signature(BaseObserver.schedule).parameters
    else {}
)


class _DirectoryHandler(FileSystemEventHandler):
    def __init__(self, watcher: DirectoryWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in CHANGES or (event.is_directory and event.event_type == "modified"):
            # a directory's "modified" is the echo of an entry changing in it, reported on its own
            return
        paths = [event.src_path]
        dest = getattr(event, "dest_path", "")
        if dest:
            paths.append(dest)
        self._watcher.dispatch(paths)


class DirectoryWatcher:
    """Maps watched directories to the controls that care; drops the agent's own write echoes."""

    def __init__(self, echo: EchoFilter) -> None:
        self._echo = echo
        self._observer = Observer()
        self._observer.daemon = True
        self._lock = threading.Lock()
        self._schedule_lock = threading.Lock()
        self._watches: dict[str, tuple[ObservedWatch, int]] = {}  # directory -> (watch, its inode)
        # directory -> control name -> names of interest in it (None: all)
        self._interested: dict[str, dict[str, frozenset[str] | None]] = {}
        self._triggers: dict[str, Trigger] = {}
        self._handler = _DirectoryHandler(self)

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        if self._observer.is_alive():  # a daemon stopping before its start-up finished never started it
            self._observer.join(10)

    def set_watches(self, control: str, specs: Iterable[WatchSpec], trigger: Trigger) -> None:
        """(Re)declare where a control looks; a missing directory is watched through its parent."""
        wanted: dict[str, frozenset[str] | None] = {}
        for spec in specs:
            directory, names = _watchable(spec)
            if directory in wanted and (wanted[directory] is None or names is None):
                wanted[directory] = None
            else:
                wanted[directory] = (wanted.get(directory) or frozenset()) | names if names is not None else None
        # watchdog holds its observer lock while it calls dispatch(), which takes self._lock: so schedule
        # and unschedule (which take the observer lock) are never called holding self._lock, or a watched
        # directory replaced while its events are dispatched deadlocks the agent (a user's ~/.ssh swapped
        # back and forth did). _schedule_lock keeps two controls' set_watches from interleaving.
        with self._schedule_lock:
            with self._lock:
                self._triggers[control] = trigger
                dropped = []
                for directory, controls in list(self._interested.items()):
                    controls.pop(control, None)
                    if not controls and directory not in wanted:
                        del self._interested[directory]
                        dropped.append(directory)
                for directory, names in wanted.items():
                    self._interested.setdefault(directory, {})[control] = names
            for directory in dropped:
                self._unschedule(directory)
            for directory in wanted:
                inode = _inode(directory)
                current = self._watches.get(directory)
                if current is not None and current[1] != inode:
                    # the directory was deleted and made again: the old inotify watch is dead
                    self._unschedule(directory)
                    current = None
                if current is None and inode is not None:
                    watch = self._observer.schedule(self._handler, directory, recursive=False, **_EVENT_FILTER)
                    with self._lock:
                        self._watches[directory] = (watch, inode)

    def forget_move_records(self) -> None:
        """Work around watchdog 2.2.1's inotify leak (upstream issue #1041): every rename in a watched
        directory is remembered forever. Called when quiet (after a converge); losing the pairing of a
        move in flight only turns it into a "created" event, which triggers a converge just the same."""
        for emitter in list(getattr(self._observer, "emitters", ())):
            records = getattr(getattr(getattr(emitter, "_inotify", None), "_inotify", None), "_moved_from_events", None)
            if isinstance(records, dict):
                records.clear()

    def _unschedule(self, directory: str) -> None:
        """Holding _schedule_lock, never self._lock (see set_watches)."""
        with self._lock:
            entry = self._watches.pop(directory, None)
        if entry is not None:
            try:
                self._observer.unschedule(entry[0])
            except KeyError:
                pass  # watchdog already dropped the watch of a deleted directory

    def watched(self) -> list[str]:
        with self._lock:
            return sorted(self._watches)

    def dispatch(self, paths: list[str]) -> None:
        if all(self._echo.is_echo(p) for p in paths):
            return
        hits: set[str] = set()
        with self._lock:
            for path in paths:
                directory, name = os.path.split(path)
                for control, names in self._interested.get(directory, {}).items():
                    if names is None or name in names:
                        hits.add(control)
                for control in self._interested.get(path, {}):
                    hits.add(control)  # an event on a watched directory itself (deleted, moved)
            triggers = [self._triggers[n] for n in hits if n in self._triggers]
        for trigger in triggers:
            trigger(paths[-1])


def _watchable(spec: WatchSpec) -> tuple[str, frozenset[str] | None]:
    """The nearest existing directory, and the names in it that matter."""
    directory, names = spec.directory, spec.names
    while not directory.is_dir() and directory.parent != directory:
        names = frozenset({directory.name})
        directory = directory.parent
    return os.fspath(directory), names


def _inode(directory: str) -> int | None:
    try:
        return os.stat(directory).st_ino
    except OSError:
        return None


class NetlinkWatcher:
    """One thread reading netlink multicast groups; any message triggers the controls that listen to
    it (the runner's debounce folds a burst into one converge). Sockets open on demand and close when
    no control wants their group any more."""

    def __init__(self, subscribe: Callable[[int, int], socket.socket] = netlink_subscribe) -> None:
        self._subscribe = subscribe
        self._lock = threading.Lock()
        self._sockets: dict[NetlinkGroup, socket.socket] = {}
        self._interested: dict[NetlinkGroup, set[str]] = {}
        self._triggers: dict[str, Trigger] = {}
        self.errors: dict[NetlinkGroup, str] = {}
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="netlink-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(10)
        with self._lock:
            for sock in self._sockets.values():
                sock.close()
            self._sockets.clear()

    def set_watches(self, control: str, groups: Iterable[NetlinkGroup], trigger: Trigger) -> None:
        wanted = set(groups)
        with self._lock:
            self._triggers[control] = trigger
            for group in list(self._interested):
                if group not in wanted:
                    self._interested[group].discard(control)
                    if not self._interested[group]:
                        del self._interested[group]
                        sock = self._sockets.pop(group, None)
                        if sock is not None:
                            sock.close()
            for group in wanted:
                self._interested.setdefault(group, set()).add(control)
                if group not in self._sockets:
                    try:
                        self._sockets[group] = self._subscribe(group.protocol, group.group)
                        self.errors.pop(group, None)
                    except OSError as exc:
                        self.errors[group] = str(exc)  # the control's periodic reconcile still runs
        self._wake()

    def watched(self) -> list[str]:
        with self._lock:
            return sorted(f"netlink:{g.protocol}/{g.group}" for g in self._sockets)

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"x")
        except BlockingIOError:
            pass

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                by_fd = {sock.fileno(): group for group, sock in self._sockets.items()}
            try:
                readable, _, _ = select.select([self._wake_read, *by_fd], [], [], 60.0)
            except (OSError, ValueError):
                continue  # a socket closed under us by set_watches: look again
            for fd in readable:
                if fd == self._wake_read:
                    _drain_fd(fd)
                    continue
                group = by_fd[fd]
                self._drain(group)
                with self._lock:
                    triggers = [self._triggers[c] for c in self._interested.get(group, ()) if c in self._triggers]
                for trigger in triggers:
                    trigger(f"netlink {group.protocol}/{group.group}")

    def _drain(self, group: NetlinkGroup) -> None:
        with self._lock:
            sock = self._sockets.get(group)
        if sock is None:
            return
        while True:
            try:
                sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ENOBUFS: messages were lost, which is still "something changed"


def _drain_fd(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
