"""Inside a server under load: every few seconds, one JSON line of where its memory is (resident, anonymous and
file-backed; glibc's arenas: bytes in use, bytes held free, chunks mapped on their own; Python's live objects). So
that a rising RSS can be told apart: more in use (something kept), more held free (the allocator's retention), or
anonymous memory outside glibc's malloc (Python's own object arenas, thread stacks, other mappings).

``python -m bench.load --malloc-stats`` starts the app with it and keeps the samples in its JSON. Resident memory is
read by ``dpo_space.memory.resident_mb``, as the app's own trimming and ``bench.load`` read it.
"""

from __future__ import annotations

import ctypes
import gc
import json
import threading
import time

from dpo_space.memory import resident_mb

MB = 2**20


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


def sample(libc) -> dict:
    info = libc.mallinfo2()
    return {"time": round(time.time(), 1), **resident_mb(),
            "arenas_mb": round(info.arena / MB, 1), "in_use_mb": round(info.uordblks / MB, 1),
            "held_free_mb": round(info.fordblks / MB, 1), "mapped_chunks_mb": round(info.hblkhd / MB, 1),
            "python_objects": len(gc.get_objects())}  # fmt: skip


def start(path: str, every_s: float = 30.0) -> threading.Event:
    """Append a sample to ``path`` every ``every_s`` seconds, from a daemon thread; returns the event that stops it."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            with open(path, "a") as out:
                out.write(json.dumps(sample(libc)) + "\n")

    threading.Thread(target=loop, name="malloc-probe", daemon=True).start()
    return stop
