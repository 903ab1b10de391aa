"""`bench drift` judges latency by the p99 of a trailing window, not of one second: at 50 requests/s a
second's "p99" is its slowest answer, so one slow answer would fail the run, while twenty in one window
(2% of its answers) must."""

from __future__ import annotations

import numpy as np

from towerann.bench.drift import trailing_p99

RATE, SECONDS, WINDOW = 50, 60, 20


def _run(slow_at: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    second = np.repeat(np.arange(SECONDS), RATE)
    latency = np.full(len(second), 3.0)
    latency[slow_at] = 80.0
    return second, latency, np.ones(len(second), bool)


def test_one_slow_answer_does_not_move_the_window_p99() -> None:
    second, latency, ok = _run([30 * RATE])
    p99 = trailing_p99(second, latency, ok, WINDOW)
    assert len(p99) == SECONDS and max(v for v in p99 if v is not None) < 10.0
    assert trailing_p99(second, latency, ok, 1)[30] > 10.0  # the per-second "p99" would have failed it


def test_two_percent_slow_answers_lift_every_window_that_holds_them() -> None:
    slow = [30 * RATE + i for i in range(20)]  # 20 of 1,000 in any window holding second 30
    second, latency, ok = _run(slow)
    p99 = trailing_p99(second, latency, ok, WINDOW)
    over = [s for s, v in enumerate(p99) if v is not None and v > 10.0]
    assert over == list(range(30, 30 + WINDOW))  # the windows ending at 30..49 hold them, no other


def test_failed_and_unknown_answers_are_left_out() -> None:
    second, latency, ok = _run(list(range(30 * RATE, 30 * RATE + 40)))
    ok[30 * RATE : 30 * RATE + 40] = False  # the slow ones failed: not latencies of answers
    latency[0] = np.nan  # an answer without a server timing
    p99 = trailing_p99(second, latency, ok, WINDOW)
    assert max(v for v in p99 if v is not None) == 3.0
