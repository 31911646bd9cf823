"""One generation request and its one state, shared by the engine (which streams it) and the scheduler (which
decodes it).

The scheduler's thread moves a request from ``WAITING`` to ``RUNNING`` and on to ``FINISHED``; the consumer may
ask it to stop at any time (Stop, a closed tab), which ends it at the next decoding step. Its tokens go to a
``transformers.TextIteratorStreamer``, which turns them into text for whoever reads the stream.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field


class Phase(enum.Enum):
    WAITING = "waiting"  # queued for a batch
    RUNNING = "running"  # in a batch: its tokens stream
    STOPPING = "stopping"  # asked to stop: it ends at the next step (or leaves the queue)
    FINISHED = "finished"  # the model is done with it; its stream has ended


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    settings: object  # inputs.GenerationSettings
    use_reference: bool  # decode with the reference model instead of the policy
    streamer: object = None  # a TextIteratorStreamer that receives each token; None: read ``generated``
    generated: list[int] = field(default_factory=list)  # the token ids produced so far (EOS not included)
    generator: object = None  # its seeded torch.Generator, kept across restarts of its batch
    error: BaseException | None = None  # why the model failed it, if it did
    phase: Phase = Phase.WAITING
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def start(self) -> None:
        with self._changed:
            if self.phase is Phase.WAITING:
                self.phase = Phase.RUNNING

    def stop(self) -> None:
        """Ask it to end: from any thread, at any time."""
        with self._changed:
            if self.phase in (Phase.WAITING, Phase.RUNNING):
                self.phase = Phase.STOPPING

    @property
    def stopped(self) -> bool:
        return self.phase is Phase.STOPPING

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    @property
    def should_end(self) -> bool:
        """Asked to stop, or its whole budget is produced: its next token is EOS."""
        return self.stopped or len(self.generated) >= self.settings.max_new_tokens

    def emit(self, token: int) -> None:
        self.generated.append(token)
        if self.streamer is not None:
            import torch

            self.streamer.put(torch.tensor([token]))

    def finish(self, error: BaseException | None = None) -> None:
        """The model is done with it (its last token, a stop, or ``error``); its stream ends."""
        with self._changed:
            if self.phase is Phase.FINISHED:
                return
            self.error = error
            self.phase = Phase.FINISHED
            self._changed.notify_all()
        if self.streamer is not None:
            self.streamer.end()

    def wait_finished(self, timeout: float | None = None) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.phase is Phase.FINISHED, timeout)
