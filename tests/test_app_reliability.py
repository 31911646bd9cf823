"""The Space under load, disconnects, hostile input, a crashing model, and what it must never reveal."""

import json
import math
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bench.load import KINDS, run_load
from tests.server import ROOT, running_app

pytestmark = pytest.mark.slow  # the real app under load, hostile input and a crashing model

SECRET = "hf_neverShowThisToken0123456789abcdef"
GREEDY = [16, 0.0, 1.0, 0, 1.0, 0, 0]
CRASH_PREAMBLE = """
from transformers import AutoTokenizer, LlamaForCausalLM
from dpo_space.models import resolve
_crash_ids = set(AutoTokenizer.from_pretrained(resolve("tiny"))(" Xylophone", add_special_tokens=False).input_ids)
_forward = LlamaForCausalLM.forward
def forward(self, input_ids=None, *args, **kwargs):
    if input_ids is not None and _crash_ids <= set(input_ids[0].tolist()):
        raise RuntimeError("injected fault in forward")
    return _forward(self, input_ids, *args, **kwargs)
LlamaForCausalLM.forward = forward
from dpo_space.cpu.decoder import LlamaDecoder
_prefill_rows = LlamaDecoder.prefill_rows
def prefill_rows(self, prompts):
    if any(_crash_ids <= set(token_ids) for token_ids in prompts):
        raise RuntimeError("injected fault in the decoder")
    return _prefill_rows(self, prompts)
LlamaDecoder.prefill_rows = prefill_rows
"""


@pytest.fixture(scope="module")
def app(tiny_adapter):
    # ARENA_MIN_SECONDS=0: the load test's simulated visitors vote as soon as their replies end
    with running_app(tiny_adapter, preamble=CRASH_PREAMBLE, HF_TOKEN=SECRET, QUEUE_MAX_SIZE="16",
                     ARENA_MIN_SECONDS="0") as (url, proc):  # fmt: skip
        yield url, proc


@pytest.fixture(scope="module")
def client(app):
    return Client(app[0], verbose=False)


def active(client) -> int:
    return client.predict(api_name="/info")["active_generations"]


def sse_call(url: str, api: str, data: list, timeout: float = 60) -> tuple[str, object]:
    """Call an endpoint over Gradio's plain HTTP API; return the final event and its payload."""
    with httpx.Client(base_url=url, timeout=timeout) as http:
        posted = http.post(f"gradio_api/call/{api}", content=json.dumps({"data": data}, allow_nan=True),
                           headers={"content-type": "application/json"})  # fmt: skip
        if posted.status_code != 200:
            return f"http {posted.status_code}", posted.text
        event, payload = None, None
        with http.stream("GET", f"gradio_api/call/{api}/{posted.json()['event_id']}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event in ("complete", "error"):
                    return event, json.loads(line.removeprefix("data: "))
    return event or "no event", payload


def test_32_concurrent_users_of_every_kind_are_served_or_told_busy(app):
    """Chat, Generate, Compare, Arena rounds with votes and OpenAI-API calls at once (bench.load's mix)."""
    url, proc = app
    result = run_load(url, proc.pid, users=32, requests=2, rounds=2, max_new_tokens=8)
    assert set(result["outcomes"]) <= {"completed", "busy"}, result["outcomes"]
    assert result["outcomes"]["completed"] >= 16 * 2  # the queue holds 16; memory and latency: python -m bench.load
    assert all(result["by_kind"][kind].get("completed") for kind in KINDS), result["by_kind"]


def wait_until_idle(client, deadline_s: float = 60) -> bool:
    """Whether the server reports no active generation before the deadline (a bound on waiting, not a target)."""
    deadline = time.monotonic() + deadline_s
    while active(client):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_client_that_drops_mid_stream_frees_the_worker(app, client):
    url, _ = app
    with httpx.Client(base_url=url, timeout=60) as http:
        data = ["Once upon a time", "Continue text", 1024, 0.0, 1.0, 0, 1.3, 0, 0]
        event_id = http.post("gradio_api/call/generate", json={"data": data}).json()["event_id"]
        with http.stream("GET", f"gradio_api/call/generate/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("data: ") and len(line) > 20:
                    break  # the first tokens arrived; now vanish
    assert wait_until_idle(client)
    assert client.predict("Hi", "Assistant reply", *GREEDY, api_name="/generate") is not None


def test_a_model_that_raises_gives_a_clear_error_and_the_server_goes_on(client):
    with pytest.raises(Exception) as error:
        client.predict("Play the Xylophone", "Continue text", *GREEDY, api_name="/generate")
    assert "the model failed while generating (RuntimeError); try again" in str(error.value)
    assert "Traceback" not in str(error.value) and "injected" not in str(error.value)
    assert client.predict("Hi", "Assistant reply", *GREEDY, api_name="/generate") is not None


KNOWN_ERRORS = ("must be", "must have", "is empty", "limit is", "mode must be one of",
                "didn't receive enough input values", "unknown round", "its vote already", "still coming",
                "faster than a person")  # fmt: skip
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70), st.none(), st.booleans(),
    st.text(max_size=8), st.lists(st.integers(), max_size=2),
)  # fmt: skip
texts = st.one_of(st.text(max_size=300), st.sampled_from(["", " \t\n", "\x00\x01\x1b[2J", "a" * 1_000_000]),
                  numbers)  # fmt: skip


def short(values: list) -> list:
    """Keep valid generations short: a max_new_tokens in (8, 1024] becomes 8 (the range is still tested)."""
    first = values[0]
    if isinstance(first, int | float) and not isinstance(first, bool) and 8 < first <= 1024:
        values = [8, *values[1:]]
    return values


def check_outcome(app, event, payload):
    assert not event.startswith("http 5"), (event, payload)
    if event == "error":
        message = str((payload or {}).get("error"))
        assert any(k in message for k in KNOWN_ERRORS), message
        assert "Traceback" not in message and 'File "' not in message
    else:
        assert event == "complete" or event.startswith("http 4"), (event, payload)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(prompt=texts, mode=st.one_of(st.sampled_from(["Assistant reply", "Continue text"]), texts),
       values=st.lists(numbers, min_size=7, max_size=7), keep=st.integers(0, 9))  # fmt: skip
@example(prompt="", mode=None, values=[0.0, 0.0, math.inf, 0.0, 0.0, 0.0, 0.0], keep=5)  # once a 500: 422 echoed inf
def test_hostile_generate_input(app, prompt, mode, values, keep):
    event, payload = sse_call(app[0], "generate", [prompt, mode, *short(values)][:keep])
    check_outcome(app, event, payload)


@pytest.mark.parametrize("api", ["compare", "arena"])  # a prompt and the settings: both replies at once
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(prompt=texts, values=st.lists(numbers, min_size=7, max_size=7), keep=st.integers(0, 8))
@example(prompt=None, values=[math.inf, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], keep=8)  # once "cannot convert float infinity"
def test_hostile_two_reply_input(app, api, prompt, values, keep):
    event, payload = sse_call(app[0], api, [prompt, *short(values)][:keep])
    check_outcome(app, event, payload)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(prompt=texts, a=texts, b=texts, keep=st.integers(0, 3))
def test_hostile_judge_input(app, prompt, a, b, keep):
    event, payload = sse_call(app[0], "judge", [prompt, a, b][:keep])
    check_outcome(app, event, payload)


histories = st.one_of(texts, st.lists(st.one_of(numbers, st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "robot"]), "content": texts})), max_size=3))  # fmt: skip


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(message=texts, history=histories, system=texts, model=st.one_of(st.sampled_from(["DPO model", "Reference"]),
       texts), values=st.lists(numbers, min_size=7, max_size=7), keep=st.integers(0, 11))  # fmt: skip
def test_hostile_chat_input(app, message, history, system, model, values, keep):
    event, payload = sse_call(app[0], "chat", [message, history, system, model, *short(values)][:keep])
    check_outcome(app, event, payload)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(round_id=st.one_of(texts, st.from_regex(r"[0-9a-f]{16}", fullmatch=True)),
       choice=st.one_of(st.sampled_from(["A", "B", "tie", "both_bad"]), texts), keep=st.integers(0, 2))  # fmt: skip
def test_hostile_vote_input(app, round_id, choice, keep):
    event, payload = sse_call(app[0], "vote", [round_id, choice][:keep])
    check_outcome(app, event, payload)


def test_a_real_round_refuses_hostile_votes_and_then_takes_a_valid_one(client):
    round_id = client.predict("Hi", *GREEDY, api_name="/arena")[0]
    for choice in ["", "a", "A ", None, 1, ["A"], {"vote": "A"}, "both bad", "\x00"]:
        with pytest.raises(Exception, match="the vote must be one of A, B, tie, both_bad"):
            client.predict(round_id, choice, api_name="/vote")
    revealed, board = client.predict(round_id, "tie", api_name="/vote")
    assert "DPO model" in revealed and board["ties"] >= 1
    with pytest.raises(Exception, match="this round has its vote already"):
        client.predict(round_id, "A", api_name="/vote")


def test_the_server_still_serves_after_the_hostile_input(client):
    assert client.predict("Hi", "Assistant reply", *GREEDY, api_name="/generate") is not None


def test_the_token_never_appears_in_responses_or_logs(app, client):
    url, proc = app
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("", "Assistant reply", *GREEDY, api_name="/generate")
    responses = [json.dumps(client.predict(api_name="/info")), httpx.get(url + "config").text, httpx.get(url).text]
    assert all(SECRET not in r for r in responses)
    assert SECRET not in proc.log_path.read_text()


@pytest.mark.parametrize("path", ["/etc/passwd", str(ROOT / "app.py"), str(Path.home() / ".cache")])
def test_no_files_are_served_outside_what_the_app_needs(app, path):
    response = httpx.get(f"{app[0]}gradio_api/file={path}")
    assert response.status_code in (403, 404), (path, response.status_code)


def test_weights_load_from_safetensors_only(tmp_path, tiny_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from dpo_space.models import load_causal_lm

    for name in ("config.json", "generation_config.json"):
        shutil.copy(Path(tiny_path) / name, tmp_path / name)
    torch.save(load_file(Path(tiny_path) / "model.safetensors"), tmp_path / "pytorch_model.bin")  # a pickle
    with pytest.raises(OSError, match=r"Could not load model .*model\.safetensors"):
        load_causal_lm(str(tmp_path))


def test_a_model_folder_with_remote_code_never_runs_it(tmp_path, tiny_path):
    import shutil

    from dpo_space.models import load_causal_lm

    for name in ("model.safetensors", "generation_config.json"):
        shutil.copy(Path(tiny_path) / name, tmp_path / name)
    config = json.loads((Path(tiny_path) / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "remote code ran"
    (tmp_path / "evil.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    try:
        model = load_causal_lm(str(tmp_path))
    except (OSError, ValueError) as e:  # refused: say so, do not run it
        assert "trust_remote_code" in str(e)
    else:
        assert type(model).__module__.startswith("transformers.models.llama")  # the library's own class
    assert not ran.exists()
