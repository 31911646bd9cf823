"""The queue in front of the model: one thread takes waiting requests in batches and hands each batch to a
decoding backend (``plain.GenerateBackend`` or ``cpu.DecoderBackend``), which runs it to the end and lets
requests that arrive meanwhile join.

First come, first served: a request joins a running batch only when it is the oldest waiting one and there is
room. With ``generate`` a batch holds requests for one model (the policy or its reference); the CPU decoder's
backend (``mixes_models``) takes both in one batch.
"""

from __future__ import annotations

import logging
import threading
import time

from dpo_space.request import Request

logger = logging.getLogger(__name__)

IDLE_S = 2.0  # seconds without requests after which the scheduler's thread ends


class Scheduler:
    def __init__(self, backend, max_batch: int, wait_s: float = 0.01):
        self.backend = backend  # run(batch, scheduler): decodes ``batch`` (which grows as requests join) to its end
        self.max_batch = max_batch
        self.wait_s = wait_s  # how long a new batch waits for requests sent at the same moment
        self._waiting: list[Request] = []
        self._ready = threading.Condition()
        self.batch_sizes: list[int] = []  # rows each time a batch starts or grows, for benchmarks and tests
        self.thread: threading.Thread | None = None  # the model's thread; it ends after IDLE_S without requests

    def submit(self, request: Request) -> None:
        with self._ready:
            self._waiting.append(request)
            self._ready.notify()
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
                self.thread.start()

    def withdraw(self, request: Request) -> None:
        """Stop a request: a waiting one leaves the queue at once, a running one ends at the next step."""
        request.stop()
        with self._ready:
            if request in self._waiting:
                self._waiting.remove(request)
                request.finish()

    def can_join(self, use_reference: bool | None, running: int) -> bool:
        """The oldest waiting request fits beside ``running`` rows and is for this model (``use_reference``; None:
        for either)."""
        waiting = self._waiting[:1]
        return (running < self.max_batch and bool(waiting)
                and use_reference in (None, waiting[0].use_reference))  # fmt: skip

    def joining(self, use_reference: bool | None, running: int) -> list[Request]:
        """The waiting requests that join a batch of ``running`` rows now (removed from the queue): for this model,
        or for either (None)."""
        with self._ready:
            if not self.can_join(use_reference, running):
                return []
            return self._take(use_reference, self.max_batch - running)

    def _take(self, use_reference: bool | None, room: int) -> list[Request]:
        """Remove up to ``room`` waiting requests for this model (None: for either) from the queue, oldest first
        (the caller holds ``_ready``); those already stopped finish here."""
        taken = [r for r in self._waiting if use_reference in (None, r.use_reference)][:room]
        for request in taken:
            self._waiting.remove(request)
            if request.stopped:
                request.finish()
        return [r for r in taken if not r.finished]

    def _next_batch(self) -> list[Request] | None:
        """The next batch, or None after ``IDLE_S`` without requests: then this thread has ended its turn (a
        thread that ran torch keeps an OpenMP team while it lives: ``engine.in_own_thread``)."""
        while True:
            with self._ready:
                if not self._ready.wait_for(lambda: self._waiting, timeout=IDLE_S):
                    self.thread = None  # the next submit starts another
                    return None
            time.sleep(self.wait_s)  # let requests sent at the same moment join this batch
            with self._ready:
                if not self._waiting:  # all withdrawn meanwhile
                    continue
                model = None if self.backend.mixes_models else self._waiting[0].use_reference
                batch = self._take(model, self.max_batch)
            if batch:
                return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self.backend.run(batch, self)
            except BaseException as e:  # reported to every request of the batch, joiners included
                logger.error("generation failed", exc_info=e)
                for request in batch:
                    request.finish(error=e)
