"""Row pieces on a few threads, results in order (merge/pieces_pool.py)."""

from __future__ import annotations

import threading
import time

import pytest

from drm_lightning.merge.pieces_pool import AHEAD_PER_THREAD, in_order


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_results_come_in_the_items_order_whatever_finishes_first(threads) -> None:
    def work(i: int) -> int:
        time.sleep(0.002 * (7 - i % 7))  # later items often finish first
        return i * i

    assert list(in_order(work, range(30), threads)) == [i * i for i in range(30)]


def test_an_error_is_raised_at_its_items_place_and_later_items_stop() -> None:
    started = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        if i == 3:
            raise ValueError("piece 3 is bad")
        return i

    got = []
    with pytest.raises(ValueError, match="piece 3"):
        for value in in_order(work, range(100), threads=2):
            got.append(value)
    assert got == [0, 1, 2]
    # items are submitted at most AHEAD_PER_THREAD * threads ahead: most never started
    assert max(started) < 3 + 1 + AHEAD_PER_THREAD * 2


def test_closing_early_waits_for_the_running_items() -> None:
    running = threading.Event()
    finished = []

    def work(i: int) -> int:
        running.set()
        time.sleep(0.01)
        finished.append(i)
        return i

    results = in_order(work, range(50), threads=2)
    assert next(results) == 0
    results.close()
    count = len(finished)
    time.sleep(0.05)
    assert len(finished) == count < 50  # nothing runs after close returned
    assert not [t for t in threading.enumerate() if t.name.startswith("drm-pieces")]
