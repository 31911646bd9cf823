import platform

from dpo_space.memory import limit_malloc_arenas


def test_malloc_arenas_are_capped_unless_the_environment_chooses(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False  # glibc read the variable at start; the app leaves it be
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert limit_malloc_arenas() is (platform.libc_ver()[0] == "glibc")
