"""run.concurrently: independent tool runs of one heal at once, results in order, failures not lost."""

from __future__ import annotations

import threading
import time

import pytest

from agent.system.run import concurrently, run
from tests.unit.conftest import DeclaredCommands


def test_real_tools_run_at_once_and_answer_in_order(commands: DeclaredCommands) -> None:
    commands.real(["sleep"])  # harmless real processes: this is about running them at once
    commands.real(["sh", "-c"])
    started = time.monotonic()
    results = concurrently([lambda: run(["sleep", "0.3"]), lambda: run(["sh", "-c", "sleep 0.3; echo two"])])
    elapsed = time.monotonic() - started
    assert [r.ok for r in results] == [True, True] and results[1].stdout == "two\n"
    assert elapsed < 0.55  # one after the other would take 0.6 s


def test_the_first_failure_in_order_is_raised_after_all_have_ended() -> None:
    ended: list[str] = []

    def slow_ok() -> int:
        time.sleep(0.2)
        ended.append("slow")
        return 1

    def fails(what: str) -> int:
        ended.append(what)
        raise ValueError(what)

    with pytest.raises(ValueError, match="second"):
        concurrently([slow_ok, lambda: fails("second"), lambda: fails("third")])
    assert sorted(ended) == ["second", "slow", "third"]  # nothing was left running behind the raise


def test_one_call_or_none_runs_in_the_callers_thread() -> None:
    assert concurrently([]) == []
    assert concurrently([lambda: threading.current_thread().name]) == [threading.current_thread().name]
