"""Keep a long-running server's memory flat: at most two glibc malloc arenas, and their free pages handed back.

glibc gives each thread that allocates under contention an arena of its own, and keeps what those arenas free.
A Space serves from dozens of threads (Gradio's workers, the scheduler, the API), so its resident memory rose by
about 12 MB per round of 16 users, 21% over a 30-minute soak; with two arenas it rose 4.5% over 10 minutes against
13% (docs/performance.md). ``MALLOC_ARENA_MAX`` set in the environment is glibc's own and wins.

With two arenas the memory glibc holds free still came and went by tens of MB under load, on top of native memory
in use that rose by a few MB a minute (Python's objects stayed flat; docs/performance.md). ``trim_periodically``
hands the free pages back (``malloc_trim``) once a minute.

That rise in use was the CPU matmul libraries' kernel caches: oneDNN keeps a primitive for each matrix shape it
has run, and PyTorch's ideep a computation of its own, up to 1,024 each, and every prompt of a new length brings
new shapes. In-process, prompts of 360 new lengths, each prefilled and scored, added 578 MB in use; with both
caches at 128 entries, 78 MB. ``bound_kernel_caches`` caps both before the first matmul.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time

logger = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's malloc.h


def _glibc():
    """glibc, or None where the C library is another (macOS, musl) and has no ``mallopt``/``malloc_trim``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for the threads this process starts from now on; False where there is no glibc
    (macOS, musl) or the environment already sets ``MALLOC_ARENA_MAX``."""
    libc = _glibc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    done = bool(libc.mallopt(M_ARENA_MAX, arenas))
    if done:
        logger.info("At most %d malloc arenas (set MALLOC_ARENA_MAX to choose)", arenas)
    return done


KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's; PyTorch's ideep's


def bound_kernel_caches(capacity: int = 128) -> dict[str, str]:
    """Cap the matmul kernel caches of oneDNN and ideep (1,024 entries each by default) at ``capacity`` shapes
    each, unless the environment sets them; both libraries read the variables at their first matmul, so call this
    before loading a model. At 128 a 30-minute soak streamed as many tokens a second as runs without the cap
    (docs/performance.md). Returns what is in effect."""
    for name in KERNEL_CACHES:
        os.environ.setdefault(name, str(capacity))
    capacities = {name: os.environ[name] for name in KERNEL_CACHES}
    logger.info("Matmul kernel caches: %s", ", ".join(f"{k}={v}" for k, v in capacities.items()))
    return capacities


def resident_mb(pid: int | str = "self") -> dict:
    """A process's resident memory from ``/proc/PID/status``: all of it, its anonymous and its file-backed part."""
    wanted = {"VmRSS": "rss_mb", "RssAnon": "anonymous_mb", "RssFile": "file_mb"}
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    if not wanted.keys() <= fields.keys():
        raise RuntimeError(f"/proc/{pid}/status has no {', '.join(wanted.keys() - fields.keys())}")
    return {key: round(int(fields[name].split()[0]) / 1024, 1) for name, key in wanted.items()}


def trim_periodically(every_s: float = 60.0) -> threading.Event | None:
    """Every ``every_s`` seconds, from a daemon thread, hand the free pages of glibc's arenas back to the system
    (``malloc_trim(0)``; each trim's effect and duration are logged at DEBUG). Returns the event that stops it;
    None where there is no glibc or ``every_s`` is 0 (never)."""
    libc = _glibc()
    if libc is None or not every_s:
        return None
    stop = threading.Event()

    def trim() -> None:
        while not stop.wait(every_s):
            before, started = resident_mb()["rss_mb"], time.perf_counter()
            libc.malloc_trim(0)
            logger.debug("malloc_trim: %.0f MB resident -> %.0f MB in %.0f ms", before, resident_mb()["rss_mb"],
                         (time.perf_counter() - started) * 1000)  # fmt: skip

    threading.Thread(target=trim, name="malloc-trim", daemon=True).start()
    return stop
