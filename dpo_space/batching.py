"""Batched generation: concurrent requests share one ``generate`` call, each with its own settings and stream.

One scheduler thread owns the model. It takes up to ``max_batch`` waiting requests (those for the same model:
policy or reference), left-pads them into one batch and runs ``generate`` greedily, while ``RowSampler``
does each row's own sampling (temperature, top-k/p, penalties, its own seeded generator, its own token
budget) and ``RowStreamer`` hands each row's tokens to its request. A stopped request is ended with EOS at
the next step, so the others go on. A request that arrives while a batch runs joins it at the next step:
``generate`` stops (``JoinCheck``), and the batch restarts with each unfinished row's prompt plus the tokens
it has so far (one prefill, instead of waiting for the longest reply of the batch).

``DecoderBatcher`` schedules the same requests over a ``decoder.LlamaDecoder`` (the Space's CPU default): each
request has its own cache row, so an arrival is prefilled alone and decodes with the others from the next
step, with no restart, and ``pick_token`` does each row's sampling as ``RowSampler`` does.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

END = object()  # a row's stream is finished
IDLE_S = 2.0  # seconds without requests after which the batcher's thread ends
PACK_TOKENS = 1024  # prompts that arrive together are prefilled together up to this many tokens a pass


def packs(requests: list, budget: int) -> list[list]:
    """``requests`` in order, grouped so that each group's prompts hold at most ``budget`` tokens (or are one)."""
    groups, size = [], budget
    for request in requests:
        if size + len(request.prompt_ids) > budget:
            groups.append([])
            size = 0
        groups[-1].append(request)
        size += len(request.prompt_ids)
    return groups


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    settings: object  # serving.GenerationSettings
    use_reference: bool
    tokens: queue.Queue = field(default_factory=queue.Queue)  # token ids, then END or an exception
    generated: list[int] = field(default_factory=list)  # the token ids streamed so far
    generator: object = None  # its seeded torch.Generator, kept across restarts of its batch
    done: bool = False  # it has its last token (EOS or its budget)
    stop: threading.Event = field(default_factory=threading.Event)  # asked to stop: Stop, a closed tab
    started: threading.Event = field(default_factory=threading.Event)  # its batch is running
    finished: threading.Event = field(default_factory=threading.Event)  # the model is done with it

    @property
    def should_end(self) -> bool:
        """Asked to stop, or its whole budget is streamed: its next token is EOS."""
        return self.stop.is_set() or len(self.generated) >= self.settings.max_new_tokens


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
        for r in requests:
            r.generator = r.generator or torch.Generator(device=device).manual_seed(r.settings.seed)

    def __call__(self, input_ids, scores):
        import torch

        chosen = scores.argmax(dim=-1)  # greedy rows without penalties: one vectorised step, no device sync
        for i, request in enumerate(self.requests):
            if self.processors[i]:
                ids = input_ids[i : i + 1, self.pad_lengths[i] :]
                chosen[i] = pick_token(request, self.processors[i], ids, scores[i])
        ended = [i for i, r in enumerate(self.requests) if r.should_end]
        if ended:
            chosen[ended] = self.eos_id
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen[:, None], 0.0)


def pick_token(request: Request, processors: list, input_ids, scores) -> int:
    """A row's next token: its penalties and warpers on ``scores`` [vocab], then its seeded sample (or argmax)."""
    import torch

    row = scores[None].float()
    for processor in processors:
        row = processor(input_ids, row)
    if request.settings.temperature > 0:
        return int(torch.multinomial(torch.softmax(row[0], dim=-1), 1, generator=request.generator)[0])
    return int(row[0].argmax())


class RowStreamer:
    """generate's streamer for a batch: the prompt first (ignored), then one new token per row per step."""

    def __init__(self, requests: list[Request], eos_ids: list[int]):
        self.requests = requests
        self.eos_ids = set(eos_ids)
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for request, token in zip(self.requests, value.reshape(-1).tolist(), strict=True):
            if request.done:
                continue
            if token in self.eos_ids:
                request.done = True
            else:
                request.generated.append(token)
                request.tokens.put(token)

    def end(self):
        """generate has stopped; the batcher decides which rows are finished and which go on."""


class JoinCheck:
    """A stopping criterion: stop generate when a waiting request could join the batch (it restarts at once)."""

    def __init__(self, can_join):
        self.can_join = can_join

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.can_join(), dtype=torch.bool, device=input_ids.device)


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
        self.thread: threading.Thread | None = None  # the model's thread; it ends after IDLE_S without requests

    def submit(self, request: Request) -> None:
        with self._ready:
            self._waiting.append(request)
            self._ready.notify()
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
                self.thread.start()

    def withdraw(self, request: Request) -> None:
        """Stop a request: a waiting one leaves the queue, a running one gets EOS at the next step."""
        request.stop.set()
        with self._ready:
            if request in self._waiting:
                self._waiting.remove(request)
                request.finished.set()

    def _next_batch(self) -> list[Request] | None:
        """The next batch, or None after ``IDLE_S`` without requests: then this thread has ended its turn (a
        thread that ran torch keeps an OpenMP team while it lives: ``serving.in_own_thread``)."""
        while True:
            with self._ready:
                if not self._ready.wait_for(lambda: self._waiting, timeout=IDLE_S):
                    self.thread = None  # the next submit starts another
                    return None
            time.sleep(self.wait_s)  # let requests sent at the same moment join this batch
            with self._ready:
                if not self._waiting:  # all withdrawn meanwhile
                    continue
                batch = self._take(self._waiting[0].use_reference, self.max_batch)
            if batch:
                return batch

    def _take(self, use_reference: bool, room: int) -> list[Request]:
        """Remove up to ``room`` waiting requests for this model from the queue (caller holds ``_ready``)."""
        taken = [r for r in self._waiting if r.use_reference == use_reference][:room]
        for request in taken:
            self._waiting.remove(request)
            if request.stop.is_set():
                request.finished.set()
        return [r for r in taken if not r.stop.is_set()]

    def _can_join(self, kind: bool, rows: list[Request]) -> bool:
        """The oldest waiting request is for this model (``kind``) and fits beside ``rows`` (a finished row
        leaves room): first come, first served, so requests for the other model are not overtaken."""
        free = self.max_batch - sum(not r.done for r in rows)
        waiting = self._waiting[:1]
        return free > 0 and bool(waiting) and waiting[0].use_reference == kind

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as e:  # reported to every request of the batch
                for request in batch:
                    request.tokens.put(e)
                    request.finished.set()

    def _run(self, batch: list[Request]) -> None:
        """Generate until every row is done; rows that arrive meanwhile join at a restart. ``batch`` grows in
        place, so a failure reaches every request that joined."""
        kind, live = batch[0].use_reference, list(batch)
        with self.lock, self.model_for(kind) as model:
            while live:
                for request in live:
                    request.started.set()
                self._generate(model, live)
                for request in live:
                    if request.done or request.should_end:
                        request.done = True
                        request.tokens.put(END)
                        request.finished.set()
                with self._ready:
                    live = [r for r in live if not r.done]
                    joining = self._take(kind, self.max_batch - len(live)) if self._can_join(kind, live) else []
                batch += joining
                live += joining

    def _generate(self, model, rows: list[Request]) -> None:
        import torch

        inputs = [r.prompt_ids + r.generated for r in rows]
        width = max(len(ids) for ids in inputs)
        pad_lengths = [width - len(ids) for ids in inputs]
        ids = [[self.pad_id] * pad + row for row, pad in zip(inputs, pad_lengths, strict=True)]
        mask = [[0] * pad + [1] * len(row) for row, pad in zip(inputs, pad_lengths, strict=True)]
        self.batch_sizes.append(len(rows))
        device = model.device
        model.generate(
            input_ids=torch.tensor(ids, device=device),
            attention_mask=torch.tensor(mask, device=device),
            max_new_tokens=max(r.settings.max_new_tokens - len(r.generated) for r in rows),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            logits_processor=[RowSampler(rows, pad_lengths, self.eos_ids, device)],
            stopping_criteria=[JoinCheck(lambda: self._can_join(rows[0].use_reference, rows))],
            streamer=RowStreamer(rows, self.eos_ids),
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )


class DecoderBatcher(Batcher):
    """The batcher for ``decoder.LlamaDecoder``s (``model_for(use_reference)`` gives one): each request has its own
    cache row, so one that arrives is prefilled alone and joins the running rows at the next step, with no
    restart; a finished row leaves at once."""

    def _run(self, batch: list[Request]) -> None:
        import torch

        kind = batch[0].use_reference
        decoder = self.model_for(kind)
        decoder.reset()
        rows: list[Request] = []
        new = list(batch)
        processors: dict[int, list] = {}  # by id(request)
        with self.lock:
            while new or rows:
                for request in new:
                    request.started.set()
                    request.generator = torch.Generator().manual_seed(request.settings.seed)
                    processors[id(request)] = row_processors(request.settings)
                for group in packs(new, PACK_TOKENS):  # arrivals together: one pass through the weights
                    logits = decoder.prefill_rows([r.prompt_ids for r in group])
                    rows += group
                    self._advance(group, logits, processors)
                if new:
                    self.batch_sizes.append(len(rows))
                self._retire(decoder, rows)
                if rows:
                    self._advance(rows, decoder.decode([r.generated[-1] for r in rows]), processors)
                    self._retire(decoder, rows)
                with self._ready:
                    new = self._take(kind, self.max_batch - len(rows)) if self._can_join(kind, rows) else []
                batch += new

    def _advance(self, rows: list[Request], logits, processors: dict[int, list]) -> None:
        """Pick each row's next token from ``logits`` [rows, vocab] and stream it; EOS or the budget ends a row."""
        import torch

        chosen = logits.argmax(dim=-1).tolist()
        for i, request in enumerate(rows):
            if request.stop.is_set():
                request.done = True
                continue
            own = processors[id(request)]
            if own:
                ids = torch.tensor([request.prompt_ids + request.generated])
                chosen[i] = pick_token(request, own, ids, logits[i])
            if chosen[i] in self.eos_ids:
                request.done = True
                continue
            request.generated.append(chosen[i])
            request.tokens.put(chosen[i])
            request.done = request.should_end

    def _retire(self, decoder, rows: list[Request]) -> None:
        """End the finished rows and free their cache rows (the last row moves into a freed one, in both)."""
        for i in reversed(range(len(rows))):
            request = rows[i]
            if request.done or request.stop.is_set():
                request.done = True
                request.tokens.put(END)
                request.finished.set()
                decoder.remove_row(i)
                rows[i] = rows[-1]
                rows.pop()
