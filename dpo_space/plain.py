"""The plain decoding path: transformers' ``generate``, for GPUs and any model the CPU decoder cannot run.

A batch of requests is left-padded into one ``generate`` call, run greedily, while ``RowSampler`` does each row's
own sampling (its temperature, top-k/p, penalties, seeded generator and token budget) and ``RowStreamer`` hands
each row's tokens to its request. A stopped request gets EOS at the next step, so the others go on. A request that
arrives while a batch runs joins it at the next step: ``generate`` stops (``JoinCheck``), and the batch restarts
with each unfinished row's prompt plus the tokens it has so far (one prefill, instead of waiting for the longest
reply of the batch).
"""

from __future__ import annotations

from dpo_space.request import Request
from dpo_space.sampling import pick_token, row_processors


class RowSampler:
    """A logits processor that picks each row's next token itself and leaves ``generate`` only that token."""

    def __init__(self, requests: list[Request], pad_lengths: list[int], eos_id: int, device):
        import torch

        self.requests = requests
        self.pad_lengths = pad_lengths
        self.eos_id = eos_id
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
        ended = [i for i, r in enumerate(self.requests) if r.should_end or r.finished]
        if ended:
            chosen[ended] = self.eos_id
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen[:, None], 0.0)


class RowStreamer:
    """``generate``'s streamer for a batch: the prompt first (ignored), then one new token per row per step. EOS
    finishes its row's request."""

    def __init__(self, requests: list[Request], eos_ids: list[int]):
        self.requests = requests
        self.eos_ids = set(eos_ids)
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for request, token in zip(self.requests, value.reshape(-1).tolist(), strict=True):
            if request.finished:
                continue
            if token in self.eos_ids:
                request.finish()
            else:
                request.emit(token)

    def end(self):
        """``generate`` has stopped; the backend decides which rows are finished and which go on."""


class JoinCheck:
    """A stopping criterion: stop ``generate`` when a waiting request could join the batch of ``rows`` (a finished
    row leaves room; the batch restarts at once)."""

    def __init__(self, scheduler, use_reference: bool, rows: list[Request]):
        self.scheduler, self.use_reference, self.rows = scheduler, use_reference, rows

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        join = self.scheduler.can_join(self.use_reference, sum(not r.finished for r in self.rows))
        return torch.full((input_ids.shape[0],), join, dtype=torch.bool, device=input_ids.device)


class GenerateBackend:
    """Runs batches through ``generate``; ``model_for(use_reference)`` is a context giving the model to run."""

    mixes_models = False  # the adapter is on or off for the whole model: a batch holds one model's requests

    def __init__(self, model_for, lock, pad_id: int, eos_ids: list[int]):
        self.model_for = model_for
        self.lock = lock  # one batch or scoring at a time: the adapter toggle is global to the model
        self.pad_id = pad_id
        self.eos_ids = eos_ids

    def run(self, batch: list[Request], scheduler) -> None:
        """Generate until every row is finished; rows that arrive meanwhile join at a restart. ``batch`` grows in
        place, so a failure reaches every request that joined."""
        kind, live = batch[0].use_reference, list(batch)
        with self.lock, self.model_for(kind) as model:
            while live:
                for request in live:
                    request.start()
                scheduler.batch_sizes.append(len(live))
                self._generate(model, live, JoinCheck(scheduler, kind, live))
                for request in live:
                    if request.should_end:
                        request.finish()
                live = [r for r in live if not r.finished]
                joining = scheduler.joining(kind, len(live))
                batch += joining
                live += joining

    def _generate(self, model, rows: list[Request], join_check: JoinCheck) -> None:
        import torch

        inputs = [r.prompt_ids + r.generated for r in rows]
        width = max(len(ids) for ids in inputs)
        pad_lengths = [width - len(ids) for ids in inputs]
        ids = [[self.pad_id] * pad + row for row, pad in zip(inputs, pad_lengths, strict=True)]
        mask = [[0] * pad + [1] * len(row) for row, pad in zip(inputs, pad_lengths, strict=True)]
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
            logits_processor=[RowSampler(rows, pad_lengths, self.eos_ids[0], device)],
            stopping_criteria=[join_check],
            streamer=RowStreamer(rows, self.eos_ids),
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )
