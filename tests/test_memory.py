import json
import logging
import platform
import threading
import time

import pytest

from dpo_space.memory import bound_kernel_caches, limit_malloc_arenas, trim_periodically

GLIBC = platform.libc_ver()[0] == "glibc"


def test_malloc_arenas_are_capped_unless_the_environment_chooses(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False  # glibc read the variable at start; the app leaves it be
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert limit_malloc_arenas() is GLIBC


def test_kernel_caches_are_bounded_unless_the_environment_chooses(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "32")
    assert bound_kernel_caches(capacity=64) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "32"}


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


def test_the_malloc_probe_tells_memory_in_use_from_memory_held_free(tmp_path):
    if not GLIBC:
        pytest.skip("mallinfo2 is glibc's")
    from bench.malloc_probe import start

    path = tmp_path / "samples.jsonl"
    stop = start(str(path), every_s=0.05)
    deadline = time.monotonic() + 10
    while not (path.is_file() and path.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"time", "rss_mb", "anonymous_mb", "file_mb", "arenas_mb", "in_use_mb", "held_free_mb",
                          "mapped_chunks_mb", "python_objects"}  # fmt: skip
    assert abs(first["in_use_mb"] + first["held_free_mb"] - first["arenas_mb"]) <= 0.2  # the arenas' two parts
    assert first["rss_mb"] >= first["anonymous_mb"] > 0 and first["in_use_mb"] > 0 and first["python_objects"] > 1000
    time.sleep(0.2)  # the thread wakes from its wait and ends
    assert not any(t.name == "malloc-probe" and t.is_alive() for t in threading.enumerate())
