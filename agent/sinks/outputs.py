"""The outputs an admin configures under `events:`, wired to the one event emitter; applied at start
and on every reload. A failing output is reported (status, an output-failed event) and never stops
the daemon or slows a heal."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import events as ev
from agent.config import DEFAULT_PROMETHEUS_TEXTFILE, Config, ConfigError, Described, SyslogConfig, locate_key
from agent.paths import SystemRoot
from agent.sinks import textfile
from agent.sinks.journald import JournalSink, stdout_is_the_journal
from agent.sinks.syslog import SyslogForwarder

TEXTFILE_KEY = "events.prometheus_textfile"


class Outputs:
    def __init__(self, root: SystemRoot, events: ev.Events, daemon_status: Callable[[], dict[str, Any]]) -> None:
        self.root = root
        self.events = events
        self._daemon_status = daemon_status
        self._lock = threading.Lock()
        self._config = Config()
        self.journald = "stdout"
        self.journald_note: str | None = None
        self.syslog: SyslogForwarder | None = None
        self.writer: textfile.TextfileWriter | None = None
        self._optional_textfile = False
        self.textfile_problem: str | None = None  # the writer's error, with the config file and line

    def apply(self, config: Config) -> None:
        with self._lock:
            self._config = config
            wanted = config.events
            sinks = self.events.sinks
            sinks.retarget(self.root.path(wanted.file), to_stdout=wanted.stdout)
            sinks.journal = self._journal(config)
            if self.syslog is None or self.syslog.config != wanted.syslog:
                if self.syslog is not None:
                    self.syslog.close(flush_timeout=0.5)
                self.syslog = self._start_syslog(wanted.syslog)
            path = self.root.path(wanted.prometheus_textfile) if wanted.prometheus_textfile else None
            if self.writer is None or self.writer.path != path:
                if self.writer is not None:
                    self.writer.close()
                    textfile.remove_stale(self.writer.path, textfile.collector_owners(self.root))
                self._optional_textfile = wanted.prometheus_textfile == DEFAULT_PROMETHEUS_TEXTFILE
                self.textfile_problem = None
                self.writer = self._start_writer(path)
            listeners: list[Callable[[dict[str, Any]], None]] = []
            if self.syslog is not None:
                listeners.append(self.syslog.deliver)
            if self.writer is not None:
                writer = self.writer
                listeners.append(lambda event: writer.changed())
            sinks.listeners = tuple(listeners)

    def changed(self) -> None:
        """Something the metrics show may have changed (a converge finished)."""
        writer = self.writer
        if writer is not None:
            writer.changed()

    def status(self) -> dict[str, Any]:
        sinks = self.events.sinks
        writer, syslog = self.writer, self.syslog
        return {
            "journald": self.journald,
            "journald_note": self.journald_note or sinks.journal_error,
            "events_file": str(sinks.file_path) if sinks.file_path else None,
            "syslog": syslog.status() if syslog is not None else None,
            "prometheus_textfile": {**writer.status(), "error": self.textfile_problem} if writer is not None else None,
            "output_error": sinks.listener_error,
        }

    def close(self) -> None:
        with self._lock:
            if self.syslog is not None:
                self.syslog.close()
            if self.writer is not None:
                self.writer.close()
                self.writer.write_now()  # the last word: heals counted up to the stop

    # journald -----------------------------------------------------------------------------------------

    def _journal(self, config: Config) -> JournalSink | None:
        mode = config.events.journald
        self.journald_note = None
        if mode is False or (mode is None and not config.events.stdout):
            self.journald = "stdout" if config.events.stdout else "off"
            return None
        sink = JournalSink.load()
        if sink is None:
            self.journald = "stdout" if config.events.stdout else "off"
            if mode is True:
                self.journald_note = "events.journald is true but python3-systemd is not installed: JSON on stdout"
            return None
        if mode is None and not stdout_is_the_journal():
            self.journald = "stdout"
            return None
        self.journald = "native"
        return sink

    # remote syslog ------------------------------------------------------------------------------------

    def _start_syslog(self, config: SyslogConfig | None) -> SyslogForwarder | None:
        if config is None:
            return None
        ca_file = str(self.root.path(config.ca_file)) if config.ca_file else None
        return SyslogForwarder(config, on_outage=self._syslog_outage, ca_file=ca_file)

    def _syslog_outage(self, error: str) -> None:
        buffer = self._config.events.syslog.buffer if self._config.events.syslog else 0
        self.events.emit(
            ev.OUTPUT_FAILED,
            outcome="failure",
            level="warning",
            message=f"remote syslog unreachable ({error}): events are held (up to {buffer}) and sent when it "
            "is back; when the buffer is full the oldest are dropped and counted",
            output="syslog",
            error=error,
        )

    # the metrics textfile -----------------------------------------------------------------------------

    def _start_writer(self, path: Path | None) -> textfile.TextfileWriter | None:
        if path is None:
            return None
        return textfile.TextfileWriter(
            path,
            lambda: textfile.render(self._daemon_status(), self.root),
            self._textfile_result,
            skip_missing_directory=self._optional_textfile,
            owners=lambda: textfile.collector_owners(self.root),
        )

    def _textfile_result(self, error: str | None, refused: bool = False) -> None:
        if error is None:
            self.textfile_problem = None
            return
        source = self._config.source
        line = locate_key(source, TEXTFILE_KEY)
        problem: ConfigError | str
        if refused:
            # in full: the directory at fault and why come first, and must not be cut short
            where = source if line is None else f"{source}:{line}"
            problem = (
                f"{where}: {TEXTFILE_KEY}: refused, {error.replace(': ', ' ', 1)}; the agent writes metrics only "
                f"into a directory reached without symlinks others could replace, each directory owned by root or "
                f"{textfile.COLLECTOR_USER} and writable by no one else"
            )
        else:
            problem = ConfigError(
                source,
                line,
                TEXTFILE_KEY,
                "a file in a directory the agent can write (node_exporter installed after the agent: systemctl "
                "restart vps-agent; another directory also needs a ReadWritePaths= line: systemctl edit vps-agent)",
                # the reason first: a long path must not push it past what the message shows
                Described("{1} ({0})".format(*error.rpartition(": ")[::2])),
            )
        self.events.emit(
            ev.OUTPUT_FAILED,
            outcome="failure",
            level="error",
            message=f"metrics not written: {problem}",
            output="prometheus_textfile",
            error=str(problem),
            file_path=self._config.events.prometheus_textfile,
        )
        self.textfile_problem = str(problem)
