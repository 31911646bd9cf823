"""Inside a server under load: every few seconds, one JSON line of where its memory is (resident; glibc's arenas:
bytes in use, bytes held free, chunks mapped on their own; Python's live objects). So that a rising RSS can be told
apart: more in use (something kept) or more held free (the allocator's retention).

``python -m bench.load --malloc-stats`` starts the app with it and keeps the samples in its JSON.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import threading
import time

MB = 2**20


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


def sample(libc) -> dict:
    info = libc.mallinfo2()
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"time": round(time.time(), 1), "rss_mb": round(resident / MB, 1),
            "arenas_mb": round(info.arena / MB, 1), "in_use_mb": round(info.uordblks / MB, 1),
            "held_free_mb": round(info.fordblks / MB, 1), "mapped_chunks_mb": round(info.hblkhd / MB, 1),
            "python_objects": len(gc.get_objects())}  # fmt: skip


def start(path: str, every_s: float = 30.0) -> None:
    """Append a sample to ``path`` every ``every_s`` seconds, from a daemon thread."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def loop() -> None:
        while True:
            time.sleep(every_s)
            with open(path, "a") as out:
                out.write(json.dumps(sample(libc)) + "\n")

    threading.Thread(target=loop, name="malloc-probe", daemon=True).start()
