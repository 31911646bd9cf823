import logging
import platform
import threading
import time

from dpo_space.memory import limit_malloc_arenas, trim_periodically

GLIBC = platform.libc_ver()[0] == "glibc"


def test_malloc_arenas_are_capped_unless_the_environment_chooses(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False  # glibc read the variable at start; the app leaves it be
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert limit_malloc_arenas() is GLIBC


def test_free_memory_is_handed_back_periodically_until_stopped(caplog):
    caplog.set_level(logging.DEBUG, logger="dpo_space.memory")
    stop = trim_periodically(every_s=0.05)
    if not GLIBC:
        assert stop is None
        return
    deadline = time.monotonic() + 10
    while not any(r.message.startswith("malloc_trim: ") for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    assert any(r.message.startswith("malloc_trim: ") and " MB resident -> " in r.message for r in caplog.records)
    time.sleep(0.2)  # the thread wakes from its wait and ends
    assert not any(t.name == "malloc-trim" and t.is_alive() for t in threading.enumerate())
