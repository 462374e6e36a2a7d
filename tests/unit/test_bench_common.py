"""The benchmarks' shared arithmetic and /proc readings (bench/common.py): what RESULTS.md is built on."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from common import (  # noqa: E402
    Section,
    Stats,
    Target,
    context_switches,
    cpu_seconds,
    memory,
    percentile,
    targets_table,
    timed,
)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50.0, 95.0, 99.0)
    twenty = [float(v) for v in range(1, 21)]
    assert percentile(twenty, 99) == 20.0  # with 20 samples p99 is the maximum, never an interpolation
    assert percentile(twenty, 95) == 19.0
    assert percentile([7.0], 50) == 7.0


def test_stats_of_nothing_is_none_and_of_something_is_complete() -> None:
    assert Stats.of([]) is None
    s = Stats.of([3.0, 1.0, 2.0])
    assert s is not None and (s.n, s.min, s.p50, s.max, s.mean) == (3, 1.0, 2.0, 3.0, 2.0)


def test_the_targets_table_says_missed_targets_loudly() -> None:
    section = Section("x", targets=[Target("a < 1", "2", False), Target("b < 3", "2", True), Target("c", "d", None)])
    rows = targets_table([section])
    assert rows[2:] == ["| a < 1 | 2 | **NO** |", "| b < 3 | 2 | yes |", "| c | d | - |"]


def test_context_switches_count_every_thread_and_a_sleeping_thread_wakes() -> None:
    stop = threading.Event()
    woke = threading.Event()

    def sleeper() -> None:
        while not stop.wait(0.01):
            woke.set()

    thread = threading.Thread(target=sleeper)
    thread.start()
    try:
        assert woke.wait(5)
        before = context_switches(os.getpid())
        time.sleep(0.2)
        after = context_switches(os.getpid())
    finally:
        stop.set()
        thread.join()
    assert thread.native_id in before and threading.main_thread().native_id in before
    assert after[thread.native_id] - before[thread.native_id] >= 5  # ~20 wake-ups of 10 ms each


def test_cpu_and_memory_come_from_proc() -> None:
    start = cpu_seconds(os.getpid(), children=False)
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        pass
    assert cpu_seconds(os.getpid(), children=False) - start >= 0.05
    mem = memory(os.getpid())
    assert 0 < mem["pss"] <= mem["rss"] <= mem["hwm"]


def test_timed_reports_exit_code_output_and_peak_memory_of_a_child() -> None:
    ran = timed([sys.executable, "-c", "b = bytearray(64 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok')"])
    assert ran.result.returncode == 0 and ran.result.stdout == "ok\n"
    assert ran.peak_rss >= 64 * 2**20 and ran.cpu_s > 0 and ran.wall_ms > 0
