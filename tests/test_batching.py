"""The CPU decoder's scheduler on its own: rows join at the next step, leave at once, and Stop ends only its row.

A scripted decoder stands in for the model: each row's next token is its last token plus one, so every row's
reply is known in advance, and a hook runs between steps to act as a user would.
"""

import threading

import torch

from dpo_space.cpu.backend import DecoderBackend
from dpo_space.inputs import GenerationSettings
from dpo_space.request import Phase, Request
from dpo_space.scheduler import Scheduler

VOCAB, EOS = 100, 99


class ScriptedDecoder:
    """Cache rows hold each row's last token; the logits favour that token plus one."""

    def __init__(self, between_steps=lambda step: None, stride: int = 1):
        self.stride = stride  # the next token is the last plus this
        self.rows: list[int] = []
        self.steps = 0
        self.widths: list[int] = []  # rows decoded at each step
        self.between_steps = between_steps

    def reset(self):
        self.rows = []

    def _logits(self, last: list[int]):
        logits = torch.zeros(len(last), VOCAB)
        logits[range(len(last)), [(t + self.stride) % VOCAB for t in last]] = 1.0
        return logits

    def prefill_rows(self, prompts):
        self.rows += [p[-1] for p in prompts]
        return self._logits([p[-1] for p in prompts])

    def decode(self, tokens):
        assert len(tokens) == len(self.rows), "one token per live cache row"
        self.steps += 1
        self.widths.append(len(tokens))
        self.between_steps(self.steps)
        self.rows = list(tokens)
        return self._logits(tokens)

    def remove_row(self, i):
        self.rows[i] = self.rows[-1]
        self.rows.pop()


def request(first_token: int, max_new_tokens: int, use_reference: bool = False) -> Request:
    settings = GenerationSettings.validated(
        max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
        no_repeat_ngram_size=0, seed=0,
    )  # fmt: skip
    return Request([1, first_token], settings, use_reference=use_reference)


def scheduler_for(decoder: ScriptedDecoder, max_batch: int = 4) -> Scheduler:
    return Scheduler(DecoderBackend(lambda use_reference: decoder, threading.Lock(), [EOS]), max_batch, wait_s=0.0)


def run(decoder: ScriptedDecoder, first: list[Request], max_batch: int = 4) -> Scheduler:
    scheduler = scheduler_for(decoder, max_batch)
    for each in first:
        scheduler.submit(each)
    for each in first:
        assert each.wait_finished(10), "the scheduler finished every request"
    return scheduler


END = "end"


def streamed(req: Request) -> list:
    """The tokens it produced, then END once the model is done with it."""
    return [*req.generated, *([END] if req.phase is Phase.FINISHED and req.error is None else [])]


def test_rows_decode_together_and_each_ends_at_its_budget_or_eos():
    short, long, to_eos = request(10, 3), request(20, 6), request(95, 50)
    run(ScriptedDecoder(), [short, long, to_eos])
    assert streamed(short) == [11, 12, 13, END]
    assert streamed(long) == [21, 22, 23, 24, 25, 26, END]
    assert streamed(to_eos) == [96, 97, 98, END]  # 99 is EOS: not streamed


def test_stop_ends_its_row_at_the_next_step_and_the_others_go_on():
    stopped, other = request(10, 50), request(40, 8)
    decoder = ScriptedDecoder(lambda step: step == 3 and stopped.stop())
    run(decoder, [stopped, other])
    assert streamed(stopped) == [11, 12, 13, END]  # the token of step 3 is not streamed: it was asked to stop
    assert streamed(other) == [41, 42, 43, 44, 45, 46, 47, 48, END]
    assert decoder.widths == [2, 2, 2, 1, 1, 1, 1]  # the stopped row left its cache row after step 3


def test_an_arrival_joins_the_running_rows_at_the_next_step():
    first, late = request(10, 6), request(60, 3)
    scheduler = None

    def arrive(step):
        if step == 2:
            scheduler.submit(late)

    decoder = ScriptedDecoder(arrive)
    scheduler = scheduler_for(decoder)
    scheduler.submit(first)
    assert first.wait_finished(10) and late.wait_finished(10)
    assert streamed(first) == [11, 12, 13, 14, 15, 16, END]
    assert streamed(late) == [61, 62, 63, END]
    assert scheduler.batch_sizes == [1, 2]  # one batch: the arrival joined it, nothing restarted
    assert decoder.steps == 5  # 6 tokens of the first row: 1 from its prefill, 5 decode steps


def test_the_policy_and_the_reference_decode_in_one_batch_each_in_its_own_cache():
    """Compare and the Arena: a request for each model, sent together, stream at once (one step of each model in
    turn), and a reference request that arrives joins the running policy rows instead of waiting for their end."""
    late = request(70, 2, use_reference=True)
    scheduler = None

    def arrive(step):
        if step == 2:
            scheduler.submit(late)

    policy, reference = ScriptedDecoder(arrive), ScriptedDecoder(stride=2)
    backend = DecoderBackend(lambda use_reference: reference if use_reference else policy, threading.Lock(), [EOS])
    scheduler = Scheduler(backend, max_batch=4, wait_s=0.05)  # the pair, sent one after the other, starts together
    pair = [request(10, 5), request(10, 4, use_reference=True)]
    for each in pair:
        scheduler.submit(each)
    assert all(r.wait_finished(10) for r in [*pair, late])
    assert streamed(pair[0]) == [11, 12, 13, 14, 15, END]
    assert streamed(pair[1]) == [12, 14, 16, 18, END]
    assert streamed(late) == [72, 74, END]
    assert scheduler.batch_sizes == [2, 3]  # one batch: the pair together, then the arrival joined
    assert policy.widths == [1, 1, 1, 1] and reference.widths == [1, 1, 2]


def test_a_full_batch_makes_arrivals_wait_for_a_free_row():
    rows = [request(10 * i, 4) for i in range(1, 4)]
    scheduler = run(ScriptedDecoder(), rows, max_batch=2)
    assert [streamed(r) for r in rows] == [[11, 12, 13, 14, END], [21, 22, 23, 24, END], [31, 32, 33, 34, END]]
    assert max(scheduler.batch_sizes) == 2


def test_a_failing_model_fails_every_request_of_its_batch_and_the_next_batch_runs():
    def explode(step):
        if step == 2:
            raise RuntimeError("the model broke")

    doomed = [request(10, 8), request(20, 8)]
    scheduler = run(ScriptedDecoder(explode), doomed)
    assert all(isinstance(r.error, RuntimeError) and r.finished for r in doomed)
    after = request(30, 2)
    scheduler.backend.decoder_for = lambda use_reference: ScriptedDecoder()
    scheduler.submit(after)
    assert after.wait_finished(10) and streamed(after) == [31, 32, END]


def test_a_request_stopped_while_waiting_leaves_the_queue_without_running():
    running, waiting = request(10, 5), request(40, 4)
    scheduler = None

    def stop_the_waiting_one(step):
        if step == 1:
            scheduler.submit(waiting)  # the batch is full (one row): it waits
            scheduler.withdraw(waiting)  # Stop before any batch took it

    scheduler = scheduler_for(ScriptedDecoder(stop_the_waiting_one), max_batch=1)
    scheduler.submit(running)
    assert running.wait_finished(10) and streamed(running) == [11, 12, 13, 14, 15, END]
    assert waiting.finished and waiting.generated == []
