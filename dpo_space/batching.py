"""Batched generation: concurrent requests share one ``generate`` call, each with its own settings and stream.

One scheduler thread owns the model. It takes up to ``max_batch`` waiting requests (those for the same model:
policy or reference), left-pads them into one batch and runs ``generate`` greedily, while ``RowSampler``
does each row's own sampling (temperature, top-k/p, penalties, its own seeded generator, its own token
budget) and ``RowStreamer`` hands each row's tokens to its request. A stopped request is ended with EOS at
the next step, so the others go on. Requests that arrive during a batch wait for the next one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

END = object()  # a row's stream is finished


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    settings: object  # serving.GenerationSettings
    use_reference: bool
    tokens: queue.Queue = field(default_factory=queue.Queue)  # token ids, then END or an exception
    stop: threading.Event = field(default_factory=threading.Event)  # asked to stop: Stop, a closed tab
    started: threading.Event = field(default_factory=threading.Event)  # its batch is running
    finished: threading.Event = field(default_factory=threading.Event)  # the model is done with it


def row_processors(settings) -> list:
    from transformers import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = []  # empty: plain greedy
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size))
    if settings.temperature > 0:  # the same order as generate's own warpers
        processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k > 0:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


class RowSampler:
    """A logits processor that picks each row's next token itself and leaves generate only that token."""

    def __init__(self, requests: list[Request], pad_lengths: list[int], eos_ids: list[int], device):
        import torch

        self.requests = requests
        self.pad_lengths = pad_lengths
        self.eos_id = eos_ids[0]
        self.processors = [row_processors(r.settings) for r in requests]
        self.generators = [torch.Generator(device=device).manual_seed(r.settings.seed) for r in requests]
        self.steps = 0

    def __call__(self, input_ids, scores):
        import torch

        chosen = scores.argmax(dim=-1)  # greedy rows without penalties: one vectorised step, no device sync
        for i, request in enumerate(self.requests):
            if not self.processors[i]:
                continue
            row = scores[i : i + 1].float()
            for processor in self.processors[i]:
                row = processor(input_ids[i : i + 1, self.pad_lengths[i] :], row)
            if request.settings.temperature > 0:
                chosen[i] = torch.multinomial(torch.softmax(row[0], dim=-1), 1, generator=self.generators[i])[0]
            else:
                chosen[i] = row[0].argmax()
        ended = [i for i, r in enumerate(self.requests) if r.stop.is_set() or self.steps >= r.settings.max_new_tokens]
        if ended:
            chosen[ended] = self.eos_id
        self.steps += 1
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen[:, None], 0.0)


class RowStreamer:
    """generate's streamer for a batch: the prompt first (ignored), then one new token per row per step."""

    def __init__(self, requests: list[Request], eos_ids: list[int]):
        self.requests = requests
        self.eos_ids = set(eos_ids)
        self.done = [False] * len(requests)
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            if token in self.eos_ids:
                self.done[i] = True
                self.requests[i].tokens.put(END)
                self.requests[i].finished.set()
            else:
                self.requests[i].tokens.put(token)

    def end(self):
        for i, request in enumerate(self.requests):
            if not self.done[i]:
                self.done[i] = True
                request.tokens.put(END)
            request.finished.set()


class Batcher:
    """Runs waiting requests in batches on one thread; ``model_for(use_reference)`` gives the model to run."""

    def __init__(
        self, model_for, lock: threading.Lock, pad_id: int, eos_ids: list[int], max_batch: int, wait_s: float
    ):
        self.model_for = model_for
        self.lock = lock
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._waiting: list[Request] = []
        self._ready = threading.Condition()
        self.batch_sizes: list[int] = []  # for benchmarks and tests
        threading.Thread(target=self._loop, name="batcher", daemon=True).start()

    def submit(self, request: Request) -> None:
        with self._ready:
            self._waiting.append(request)
            self._ready.notify()

    def withdraw(self, request: Request) -> None:
        """Stop a request: a waiting one leaves the queue, a running one gets EOS at the next step."""
        request.stop.set()
        with self._ready:
            if request in self._waiting:
                self._waiting.remove(request)
                request.finished.set()

    def _next_batch(self) -> list[Request]:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._waiting)
            time.sleep(self.wait_s)  # let requests sent at the same moment join this batch
            with self._ready:
                if not self._waiting:  # all withdrawn meanwhile
                    continue
                kind = self._waiting[0].use_reference
                batch = [r for r in self._waiting if r.use_reference == kind][: self.max_batch]
                for request in batch:
                    self._waiting.remove(request)
            for request in batch:
                if request.stop.is_set():
                    request.finished.set()
            batch = [r for r in batch if not r.stop.is_set()]
            if batch:
                return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                self._run(batch)
            except BaseException as e:  # reported to every request of the batch
                for request in batch:
                    request.tokens.put(e)
                    request.finished.set()

    def _run(self, batch: list[Request]) -> None:
        import torch

        width = max(len(r.prompt_ids) for r in batch)
        pad_lengths = [width - len(r.prompt_ids) for r in batch]
        ids = [[self.pad_id] * pad + r.prompt_ids for r, pad in zip(batch, pad_lengths, strict=True)]
        mask = [[0] * pad + [1] * len(r.prompt_ids) for r, pad in zip(batch, pad_lengths, strict=True)]
        self.batch_sizes.append(len(batch))
        with self.lock, self.model_for(batch[0].use_reference) as model:
            for request in batch:
                request.started.set()
            device = model.device
            sampler = RowSampler(batch, pad_lengths, self.eos_ids, device)
            streamer = RowStreamer(batch, self.eos_ids)
            model.generate(
                input_ids=torch.tensor(ids, device=device),
                attention_mask=torch.tensor(mask, device=device),
                max_new_tokens=max(r.settings.max_new_tokens for r in batch),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                logits_processor=[sampler],
                streamer=streamer,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
            )
            streamer.end()
