"""inotify watches on parent directories (so rename-over saves by vim, sed -i, Ansible are seen)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

from agent.system.fs import EchoFilter

Trigger = Callable[[str], None]


class _DirectoryHandler(FileSystemEventHandler):
    def __init__(self, watcher: DirectoryWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type == "opened":
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
        self._watches: dict[str, tuple[ObservedWatch, int]] = {}  # directory -> (watch, its inode)
        self._interested: dict[str, set[str]] = {}  # directory -> control names
        self._triggers: dict[str, Trigger] = {}
        self._handler = _DirectoryHandler(self)

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(10)

    def set_watches(self, control: str, directories: Iterable[Path], trigger: Trigger) -> None:
        """(Re)declare the directories a control watches; missing ones are watched via their parent."""
        with self._lock:
            self._triggers[control] = trigger
            wanted = {os.fspath(_existing_ancestor(d)) for d in directories}
            for directory, names in list(self._interested.items()):
                names.discard(control)
                if not names and directory not in wanted:
                    del self._interested[directory]
                    self._unschedule(directory)
            for directory in wanted:
                self._interested.setdefault(directory, set()).add(control)
                inode = _inode(directory)
                current = self._watches.get(directory)
                if current is not None and current[1] != inode:
                    # the directory was deleted and made again: the old inotify watch is dead
                    self._unschedule(directory)
                    current = None
                if current is None and inode is not None:
                    watch = self._observer.schedule(self._handler, directory, recursive=False)
                    self._watches[directory] = (watch, inode)

    def _unschedule(self, directory: str) -> None:
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
        with self._lock:
            hits = {
                name
                for p in paths
                for directory in (os.path.dirname(p), p)
                for name in self._interested.get(directory, ())
            }
            triggers = [(self._triggers[n], n) for n in hits if n in self._triggers]
        for trigger, _ in triggers:
            trigger(paths[-1])


def _inode(directory: str) -> int | None:
    try:
        return os.stat(directory).st_ino
    except OSError:
        return None


def _existing_ancestor(directory: Path) -> Path:
    current = directory
    while not current.is_dir() and current.parent != current:
        current = current.parent
    return current
