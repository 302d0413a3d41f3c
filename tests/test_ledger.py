"""core.ledger: nested phases count exclusively, iterators are charged per next(), windows reset."""

import time

import pytest

from core.ledger import PHASES, Ledger, activated, phase, timed


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_nested_phases_are_exclusive_and_windows_reset():
    with activated(Ledger()) as ledger:
        with phase("sync_load"):
            _spin(0.02)
            for _ in timed(iter([1, 2]), "sync_export"):
                _spin(0.01)  # the consumer's time: sync_load's
        _spin(0.01)  # outside every phase
        row = ledger.close_window()
        with phase("update"):
            _spin(0.005)
        second = ledger.close_window()
    # Spins last at least their time (a busy machine only adds): inequalities that always hold.
    assert row["time/sync_load_s"] >= 0.04 > row["time/sync_export_s"] * 4  # next() on a list is nearly free
    assert row["time/step_s"] >= row["time/sync_load_s"] + row["time/sync_export_s"] + 0.01  # 10 ms: nobody's
    assert row["time/covered_frac"] < 1 and row["time/update_s"] == 0
    assert second["time/sync_load_s"] == 0 and second["time/update_s"] >= 0.005
    assert set(row) >= {f"time/{p}_s" for p in PHASES}


def test_phases_are_free_without_a_ledger_and_names_are_checked():
    with phase("update"):  # no active ledger: nothing to record, no error
        pass
    with activated(Ledger()), pytest.raises(ValueError, match="unknown step phase 'updte'"):
        with phase("updte"):
            pass


def test_phases_on_another_thread_are_not_the_trainers():
    """An overlapped rollout producer's thread times its own work; the trainer's ledger (the thread that
    built it) records only the trainer's phases, so the parts still never exceed the wall time."""
    import threading

    with activated(Ledger()) as ledger:
        producer = threading.Thread(target=lambda: [phase("generation").__enter__(), _spin(0.03)])
        with phase("update"):
            producer.start()
            _spin(0.03)
            producer.join()
        row = ledger.close_window()
    assert row["time/generation_s"] == 0 and row["time/update_s"] >= 0.03
    assert sum(row[f"time/{p}_s"] for p in PHASES) <= row["time/step_s"]
