"""The engine in-process: settings validation, prompt budget, streaming, stopping and scoring."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from dpo_space.engine import Engine, GenerationError
from dpo_space.inputs import MODE_CONTINUE, MODE_REPLY, GenerationSettings, check_text
from dpo_space.prompts import format_response, format_user_prompt
from dpo_space.settings import EngineSettings
from tests.server import ROOT, direct_greedy

GREEDY = dict(max_new_tokens=12, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
              no_repeat_ngram_size=0, seed=0)  # fmt: skip


@pytest.fixture(scope="module", params=["fp32", "generate"])
def engine(request, tiny_adapter):
    """Both ways the Space decodes: its LlamaDecoder (fp32 here, to compare tokens exactly) and ``generate``."""
    return Engine.load(tiny_adapter, settings=EngineSettings(decoder=request.param))


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("temperature", 2.5, "temperature must be in [0, 2]; got 2.5"),
        ("temperature", float("nan"), "temperature must be in [0, 2]; got nan"),
        ("max_new_tokens", 0, "max_new_tokens must be in [1, 1024]; got 0"),
        ("max_new_tokens", 1.5, "max_new_tokens must be an integer in [1, 1024]; got 1.5"),
        ("max_new_tokens", float("inf"), "max_new_tokens must be an integer in [1, 1024]; got inf"),
        ("top_k", float("nan"), "top_k must be an integer in [0, 200]; got nan"),
        ("top_k", "10", "top_k must be an integer in [0, 200]; got '10'"),
        ("top_p", None, "top_p must be a number in [0.01, 1]; got None"),
        ("seed", True, "seed must be an integer in [0, 2.14748e+09]; got True"),
    ],
)
def test_settings_name_the_parameter_and_its_range(name, value, message):
    with pytest.raises(ValueError) as error:
        GenerationSettings.validated(**{**GREEDY, name: value})
    assert str(error.value) == message


def test_settings_accept_integral_floats_and_map_greedy():
    settings = GenerationSettings.validated(**{**GREEDY, "max_new_tokens": 12.0})
    assert settings.max_new_tokens == 12 and isinstance(settings.max_new_tokens, int)
    assert settings.generate_kwargs()["do_sample"] is False
    sampled = GenerationSettings.validated(**{**GREEDY, "temperature": 0.7, "top_p": 0.9, "top_k": 40})
    assert sampled.generate_kwargs() | {"max_new_tokens": 0} == {
        "max_new_tokens": 0, "do_sample": True, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
        "temperature": 0.7, "top_p": 0.9, "top_k": 40,
    }  # fmt: skip


BAD_TEXTS = [("", "prompt is empty"), (" \n\t", "prompt is empty"), (None, "prompt must be text"),
             ("x" * 100_001, "limit is 100,000")]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD_TEXTS)
def test_bad_text_is_refused_with_a_reason(text, message):
    with pytest.raises(ValueError, match=message):
        check_text("prompt", text)


def test_prepare_formats_and_trims_to_the_budget(engine):
    tok = engine.tokenizer
    reply = engine.prepare("Hi", MODE_REPLY, 16)
    assert tok.decode(reply.input_ids) == format_user_prompt("Hi", tok) and reply.dropped_tokens == 0
    assert tok.decode(engine.prepare("Once upon", MODE_CONTINUE, 16).input_ids) == "Once upon"

    engine.max_input_tokens, saved = 8, engine.max_input_tokens
    try:
        long = engine.prepare("one two three four five six seven eight nine ten", MODE_CONTINUE, 16)
    finally:
        engine.max_input_tokens = saved
    full = tok("one two three four five six seven eight nine ten", add_special_tokens=False).input_ids
    assert long.input_ids == full[-8:] and long.dropped_tokens == len(full) - 8
    with pytest.raises(ValueError, match="mode must be one of"):
        engine.prepare("Hi", "Shout", 16)


def test_stream_yields_growing_prefixes_equal_to_direct_greedy_generate(engine):
    prepared = engine.prepare("Hello", MODE_REPLY, 12)
    chunks = list(engine.stream(prepared, GenerationSettings.validated(**GREEDY)))
    assert chunks and all(b.startswith(a) for a, b in zip(chunks, chunks[1:], strict=False))
    ids = torch.tensor([prepared.input_ids])
    with torch.no_grad():
        direct = engine.policy.model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert chunks[-1] == engine.tokenizer.decode(direct[0, ids.shape[1] :], skip_special_tokens=True)


def test_updates_come_at_most_once_per_interval_and_end_with_the_whole_reply(engine, monkeypatch):
    monkeypatch.setattr(engine, "stream_interval", 0.15)
    prepared = engine.prepare("Hello", MODE_CONTINUE, 300)
    settings = GenerationSettings.validated(**{**GREEDY, "max_new_tokens": 300})
    stamps, chunks = [], []
    for chunk in engine.stream(prepared, settings):
        stamps.append(time.monotonic())
        chunks.append(chunk)
    gaps = [b - a for a, b in zip(stamps, stamps[1:-1], strict=False)]  # the last update comes at the end
    assert len(chunks) >= 2 and all(gap >= 0.15 for gap in gaps), gaps
    assert chunks[-1] == direct_greedy(engine, prepared.input_ids, max_new_tokens=300)


def test_closing_the_stream_stops_the_model(engine, monkeypatch):
    submitted = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda *args, **kwargs: submitted.append(submit(*args, **kwargs))
                        or submitted[-1])  # fmt: skip
    settings = GenerationSettings.validated(**{**GREEDY, "max_new_tokens": 1024, "repetition_penalty": 1.3})
    stream = engine.stream(engine.prepare("Hello", MODE_CONTINUE, 1024), settings)
    next(stream)
    stream.close()  # what Gradio does on Stop or a closed tab
    request = submitted[0]
    assert request.wait_finished(60) and engine.active_generations == 0
    assert len(request.generated) < 1024  # it ended on the stop, not on its budget (the next step: test_batching)


def test_a_crashing_model_gives_a_clear_error_and_the_engine_recovers(engine, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("forward exploded")

    prepared = engine.prepare("Hello", MODE_REPLY, 4)
    settings = GenerationSettings.validated(**{**GREEDY, "max_new_tokens": 4})
    with monkeypatch.context() as patch:
        if engine.decoders:
            patch.setattr(engine.decoders[False], "prefill_rows", boom)
        else:
            patch.setattr(engine.policy.model, "generate", boom)
        with pytest.raises(GenerationError, match="failed while generating"):
            list(engine.stream(prepared, settings))
    assert list(engine.stream(prepared, settings))


def test_implicit_reward_matches_a_direct_computation(engine, tiny_adapter, tiny_path):
    from transformers import AutoModelForCausalLM

    tok = engine.tokenizer
    prompt_ids = engine.prepare("How do I boil an egg?", MODE_REPLY, 0).input_ids
    reply = "Put it in boiling water for nine minutes."
    reply_ids = tok(format_response(reply, tok) + tok.eos_token, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + reply_ids])

    def logp(model):
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        token_logps = torch.log_softmax(logits.float(), -1)[torch.arange(len(ids[0]) - 1), ids[0, 1:]]
        return token_logps[len(prompt_ids) - 1 :].sum().item()

    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    from peft import PeftModel

    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_path), tiny_adapter
    ).merge_and_unload()
    expected = engine.beta * (logp(policy) - logp(base))
    assert abs(expected) > 1e-3  # the adapter moved the model: a zero would prove nothing
    assert engine.implicit_reward(prompt_ids, reply) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def run_together(engine, jobs: list[tuple]) -> list[str]:
    """Start every stream before reading any, so the batcher sees them at once; return each final text."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: ([""] + list(engine.stream(*job)))[-1], jobs))


def test_concurrent_streams_are_batched_and_each_equals_its_own_greedy_generate(engine):
    prompts = ["Hello", "The weather today is", "Once upon a time, in a land far away,", "Why"]
    lengths = [12, 5, 9, 16]
    jobs = [
        (engine.prepare(p, MODE_REPLY, n), GenerationSettings.validated(**{**GREEDY, "max_new_tokens": n}))
        for p, n in zip(prompts, lengths, strict=True)
    ]
    before = len(engine.scheduler.batch_sizes)
    texts = run_together(engine, jobs)
    assert max(engine.scheduler.batch_sizes[before:]) > 1  # they really shared a batch
    for (prepared, settings), text in zip(jobs, texts, strict=True):
        assert text == direct_greedy(engine, prepared.input_ids, max_new_tokens=settings.max_new_tokens)


def test_each_row_keeps_its_own_penalties_and_seeded_sampling(engine):
    penalised = {**GREEDY, "max_new_tokens": 16, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2}
    sampled = {**GREEDY, "max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9, "top_k": 20, "seed": 7}
    prepared = engine.prepare("Tell me a story", MODE_REPLY, 16)
    jobs = [(prepared, GenerationSettings.validated(**penalised)), (prepared, GenerationSettings.validated(**sampled)),
            (prepared, GenerationSettings.validated(**GREEDY))]  # fmt: skip
    together = run_together(engine, jobs)
    assert together[0] == direct_greedy(engine, prepared.input_ids, max_new_tokens=16, repetition_penalty=1.5,
                                        no_repeat_ngram_size=2)  # fmt: skip
    alone = list(engine.stream(*jobs[1]))[-1]
    assert together[1] == alone  # the seed alone decides a sampled reply, batched or not
    other_seed = list(engine.stream(prepared, GenerationSettings.validated(**{**sampled, "seed": 8})))[-1]
    assert other_seed != alone


def test_stopping_one_batched_stream_leaves_the_others_running(engine):
    settings = GenerationSettings.validated(**{**GREEDY, "max_new_tokens": 40})
    prepared = engine.prepare("Hello", MODE_CONTINUE, 40)
    stopped = engine.stream(prepared, settings)
    kept = engine.stream(prepared, settings)
    next(stopped), next(kept)
    stopped.close()
    assert list(kept)[-1] == direct_greedy(engine, prepared.input_ids, max_new_tokens=40)


def test_a_request_waiting_for_its_batch_does_not_time_out(engine):
    prepared = engine.prepare("Hello", MODE_CONTINUE, 12)
    saved, engine.stream_timeout = engine.stream_timeout, 0.3
    engine._lock.acquire()  # what a long scoring call holds: no batch can start for 0.8 s
    threading.Timer(0.8, engine._lock.release).start()
    try:
        started = time.monotonic()
        waiting = list(engine.stream(prepared, GenerationSettings.validated(**GREEDY)))
        waited = time.monotonic() - started
    finally:
        engine.stream_timeout = saved
    assert waited >= 0.8  # longer than the timeout, and then it was served
    assert waiting[-1] == direct_greedy(engine, prepared.input_ids, max_new_tokens=12)


class LateStart:
    """A scheduler whose batch starts 0.3 s after the request arrives and streams its first token 0.4 s later."""

    def __init__(self, token_ids):
        self.token_ids = token_ids

    def submit(self, request):
        def run():
            time.sleep(0.3)
            request.start()
            time.sleep(0.4)
            for token in self.token_ids:
                request.emit(token)
            request.finish()

        threading.Thread(target=run, daemon=True).start()

    def withdraw(self, request):
        request.stop()


def test_a_batch_that_starts_late_in_a_wait_gets_the_whole_timeout(engine, monkeypatch):
    # the CI failure: a wait began before the batch started and ended 0.2 s after it, before its first token
    token_ids = engine.tokenizer.encode("Hello there")
    monkeypatch.setitem(engine.__dict__, "scheduler", LateStart(token_ids))
    monkeypatch.setattr(engine, "stream_timeout", 0.5)
    prepared = engine.prepare("Hello", MODE_CONTINUE, 12)
    assert list(engine.stream(prepared, GenerationSettings.validated(**GREEDY)))[-1] == "Hello there"


def test_the_policy_decodes_merged_and_round_trips_leave_the_base_weights(engine, tiny_path):
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    layers = [m for m in engine.policy.model.modules() if isinstance(m, LoraLayer)]
    prepared = engine.prepare("Hello", MODE_REPLY, 12)
    settings = GenerationSettings.validated(**GREEDY)
    for _ in range(3):
        policy_text = list(engine.stream(prepared, settings))[-1]
        assert layers and all(m.merged for m in layers) != bool(engine.decoders)  # generate: the adapter folded in
        reference_text = list(engine.stream(prepared, settings, use_reference=True))[-1]
        assert not any(m.merged for m in layers)  # the reference is the base again, not a second copy
    original = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
    for name, weight in engine.policy.model.get_base_model().state_dict().items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.allclose(weight, original[key], atol=1e-6), name
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert reference_text == direct_greedy(engine, prepared.input_ids, base, max_new_tokens=GREEDY["max_new_tokens"])
    assert policy_text == list(engine.stream(prepared, settings))[-1]


def test_a_request_arriving_during_a_batch_joins_it_and_each_still_equals_its_greedy_generate(engine):
    long_prepared = engine.prepare("Hello", MODE_CONTINUE, 300)
    expected_long = direct_greedy(engine, long_prepared.input_ids, max_new_tokens=300)
    assert len(engine.tokenizer(expected_long)["input_ids"]) > 100  # long enough to still run when the other comes
    running = engine.stream(long_prepared, GenerationSettings.validated(**{**GREEDY, "max_new_tokens": 300}))
    next(running)
    before = len(engine.scheduler.batch_sizes)
    prepared = engine.prepare("Why", MODE_REPLY, 12)
    joined = list(engine.stream(prepared, GenerationSettings.validated(**GREEDY)))[-1]
    assert 2 in engine.scheduler.batch_sizes[before:]  # it joined the running batch instead of waiting for its end
    assert joined == direct_greedy(engine, prepared.input_ids, max_new_tokens=12)
    assert list(running)[-1] == expected_long  # the restart (prompt + tokens so far) changed nothing


def test_arrivals_are_prefilled_in_packs_of_at_most_the_token_budget():
    from dpo_space.cpu.backend import packs
    from dpo_space.request import Request

    def sizes(lengths, budget):
        return [[len(r.prompt_ids) for r in group] for group in packs([Request([0] * n, None, False)
                                                                       for n in lengths], budget)]  # fmt: skip

    assert sizes([3, 3, 5, 1], 6) == [[3, 3], [5, 1]]
    assert sizes([7, 2], 6) == [[7], [2]]  # a prompt over the budget goes alone
    assert sizes([], 6) == []


def test_a_failed_compile_leaves_the_engine_decoding_eagerly(tiny_adapter, monkeypatch, caplog):
    """A Space without a C++ compiler, say: the error is logged and the eager decoder goes on serving."""
    from dpo_space.cpu.decoder import LlamaDecoder

    def fail(decoder):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(LlamaDecoder, "compile", fail)
    with caplog.at_level("ERROR"):
        engine = Engine.load(tiny_adapter, settings=EngineSettings(decoder="fp32", compile=True))
        engine.compiling.join(60)
    assert "Compiling the decoders failed; they go on decoding eagerly" in caplog.text
    assert not engine.compiled.is_set() and not engine.info()["compiled"]
    prepared = engine.prepare("Hello", MODE_REPLY, 12)
    assert list(engine.stream(prepared, GenerationSettings.validated(**GREEDY)))[-1]


NATIVE_THREADS = """
import json, os, sys, threading, time
import torch
from dpo_space.engine import Engine
from dpo_space.inputs import MODE_REPLY
from dpo_space.settings import EngineSettings

def native_threads():  # OS threads that are not Python threads: OpenMP workers, the tokenizer's pool
    python = {t.native_id for t in threading.enumerate()}
    return len([tid for tid in os.listdir("/proc/self/task") if int(tid) not in python])

def load_and_score():
    engine = Engine.load(sys.argv[1], settings=EngineSettings(decoder="int4"))
    engine.implicit_reward(engine.prepare("Hello", MODE_REPLY, 8).input_ids, "Hi there")

counts = {"torch_threads": torch.get_num_threads()}
def caller():
    counts["before"] = native_threads()
    load_and_score()
    deadline = time.monotonic() + 5
    while native_threads() > counts["before"] and time.monotonic() < deadline:  # ended teams leave in ms
        time.sleep(0.01)
    counts["after"] = native_threads()

for target in (load_and_score, caller):  # the first starts the process-wide pools (the tokenizer's)
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
print(json.dumps(counts))
"""


@pytest.mark.slow
def test_loading_and_scoring_leave_no_openmp_team_in_the_calling_thread(embedded_path):
    """Each thread that runs parallel torch code keeps an OpenMP team (worker threads) while it lives; with more of
    them than cores, libgomp stops spinning and every team slows down (decoding ran at ~0.5x here beside one idle
    team). The engine computes in threads that end, so a caller (a web server's worker) keeps none. In a process
    of its own, with no other engine's threads coming and going, and torch's own thread count (not the one thread
    that parallel test workers are given)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", NATIVE_THREADS, embedded_path], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.splitlines()[-1])
    if counts["torch_threads"] < 2:
        pytest.skip("one torch thread on this machine: no OpenMP team to leave behind")
    assert counts["after"] <= counts["before"], counts  # a pool thread of the first call may end meanwhile


def test_the_scheduler_thread_ends_when_idle_and_a_request_starts_another(engine, monkeypatch):
    """Its OpenMP team goes with it, so engines that take turns in one process (benchmarks) do not slow each other."""
    import dpo_space.scheduler

    monkeypatch.setattr(dpo_space.scheduler, "IDLE_S", 0.2)
    prepared = engine.prepare("Hello", MODE_CONTINUE, 12)
    first = list(engine.stream(prepared, GenerationSettings.validated(**GREEDY)))[-1]
    thread = engine.scheduler.thread
    thread.join(timeout=30)  # a wait that began before the patch can last the old IDLE_S
    assert not thread.is_alive() and engine.scheduler.thread is None
    assert list(engine.stream(prepared, GenerationSettings.validated(**GREEDY)))[-1] == first
    assert engine.scheduler.thread is not thread


@pytest.mark.slow
def test_the_warm_command_fills_the_compile_cache_that_the_next_start_reads(tiny_adapter, tmp_path):
    """python -m dpo_space.warm compiles into COMPILE_CACHE_DIR; a second start loads every compiled library from
    there and builds none anew, not even one it rewrites in place (the cold start is paid once per machine or
    image, not per restart)."""
    cache = tmp_path / "compile-cache"
    env = {**os.environ, "COMPILE_CACHE_DIR": str(cache), "DECODER": "fp32"}
    command = [sys.executable, "-m", "dpo_space.warm", "--model", tiny_adapter]

    def warm() -> tuple[dict, dict]:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1]), {p: p.stat().st_mtime_ns for p in cache.rglob("*.so")}

    first, built = warm()
    assert first["compiled"] and first["cache"] == str(cache) and built
    second, found = warm()
    assert second["compiled"] and found == built
