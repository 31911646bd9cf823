"""The real app over HTTP with gradio_client: streaming, comparison, judging, bad input, Stop and a full queue."""

import asyncio
import time

import pytest
from gradio_client import Client

from tests.server import direct_greedy, running_app, wait_until_compiled

pytestmark = pytest.mark.slow  # starts the real app and calls it over HTTP

GREEDY = dict(max_new_tokens=24, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
              no_repeat_ngram_size=0, seed=7)  # fmt: skip


@pytest.fixture(scope="module")
def app(tiny_adapter):
    # fp32: the same tokens as a direct generate; an update per token, to see the stream on a fast tiny model
    with running_app(tiny_adapter, DECODER="fp32", STREAM_INTERVAL="0") as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def client(app):
    return Client(app[0], verbose=False)


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine


def test_binds_loopback_and_documents_stable_endpoints(app, client):
    assert "Running on local URL:  http://127.0.0.1:" in app[1].log_path.read_text()
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/chat", "/arena", "/vote", "/generate", "/compare", "/judge", "/info"} <= endpoints.keys()
    chat = [p["parameter_name"] for p in endpoints["/chat"]["parameters"]]
    assert chat == ["message", "history", "system_prompt", "model", *GREEDY]
    names = [p["parameter_name"] for p in endpoints["/generate"]["parameters"]]
    assert names == ["prompt", "mode", *GREEDY]


@pytest.fixture(scope="module")
def hello_reply(engine) -> str:
    """The policy's own greedy ``generate`` reply to "Hello there" (GREEDY's 24 tokens)."""
    return direct_greedy(engine, engine.prepare("Hello there", "Assistant reply", 24).input_ids, max_new_tokens=24)


def test_generate_streams_prefixes_equal_to_a_direct_generate(client, hello_reply):
    job = client.submit("Hello there", "Assistant reply", *GREEDY.values(), api_name="/generate")
    chunks = list(job)
    assert len(chunks) > 2 and all(b.startswith(a) for a, b in zip(chunks, chunks[1:], strict=False))
    assert chunks[-1] == hello_reply


def test_sampling_with_a_seed_is_reproducible(client):
    sampled = {**GREEDY, "temperature": 1.0, "top_p": 0.95, "top_k": 50}
    first = client.predict("Tell me a story", "Continue text", *sampled.values(), api_name="/generate")
    assert first == client.predict("Tell me a story", "Continue text", *sampled.values(), api_name="/generate")


def test_compare_streams_both_at_once_and_scores_like_a_direct_computation(client, engine):
    updates = list(client.submit("Hi", *GREEDY.values(), api_name="/compare"))
    policy, reference, policy_reward, reference_reward = updates[-1]
    assert any(u[0] and u[1] and u[0] != policy and u[1] != reference for u in updates)  # both growing at once
    prompt_ids = engine.prepare("Hi", "Assistant reply", 24).input_ids
    assert policy == direct_greedy(engine, prompt_ids, max_new_tokens=24)
    with engine.policy.model.disable_adapter():
        assert reference == direct_greedy(engine, prompt_ids, max_new_tokens=24)
    assert policy_reward == pytest.approx(engine.implicit_reward(prompt_ids, policy), abs=1e-4)
    assert reference_reward == pytest.approx(engine.implicit_reward(prompt_ids, reference), abs=1e-4)
    assert policy != reference  # the adapter changed the model


def test_judge_reports_the_preferred_reply_and_both_rewards(client, engine):
    verdict, reward_a, reward_b = client.predict("Q?", "Yes, gladly.", "No.", api_name="/judge")
    prompt_ids = engine.prepare("Q?", "Assistant reply", 0).input_ids
    assert reward_a == pytest.approx(engine.implicit_reward(prompt_ids, "Yes, gladly."), abs=1e-4)
    assert reward_b == pytest.approx(engine.implicit_reward(prompt_ids, "No."), abs=1e-4)
    winner = "A" if reward_a >= reward_b else "B"
    assert verdict == f"The DPO model prefers {winner} by a margin of {abs(reward_a - reward_b):.4f}."


BAD_CALLS = [
    (("   ", "Assistant reply", *GREEDY.values()), "/generate", "prompt is empty"),
    (("Hi", "Assistant reply", 24, 5.0, 1.0, 0, 1.0, 0, 7), "/generate", "temperature must be in [0, 2]; got 5.0"),
    (("Hi", "Assistant reply", "many", 0.0, 1.0, 0, 1.0, 0, 7), "/generate", "max_new_tokens must be an integer"),
    (("Hi", "Shout", *GREEDY.values()), "/generate", "mode must be one of"),
    (("Hi", 24, 0.0, 1.0, 0, 1.0, 0, -3), "/compare", "seed must be in [0, 2.14748e+09]; got -3"),
    (("Q?", "", "No."), "/judge", "response A is empty"),
]


@pytest.mark.parametrize(("args", "api_name", "message"), BAD_CALLS, ids=[c[2][:24] for c in BAD_CALLS])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(client, args, api_name, message):
    with pytest.raises(Exception) as error:
        client.predict(*args, api_name=api_name)
    assert message in str(error.value) and "Traceback" not in str(error.value)
    assert client.predict("Hi", "Assistant reply", *GREEDY.values(), api_name="/generate") is not None


def test_a_prompt_over_the_budget_is_trimmed_with_a_warning(client):
    async def run():
        job = client.submit("word " * 3000, "Continue text", *GREEDY.values(), api_name="/generate")
        logs = [u.log for u in [update async for update in job] if getattr(u, "log", None)]
        return logs, job.outputs()

    logs, outputs = asyncio.run(run())
    assert outputs, "a trimmed prompt still generates"
    assert ("The prompt is 3001 tokens; kept the last 1024.", "warning") in logs


def test_stop_ends_the_server_side_generation(client):
    long = {**GREEDY, "max_new_tokens": 1024, "repetition_penalty": 1.3}
    job = client.submit("Once upon a time", "Continue text", *long.values(), api_name="/generate")
    while len(job.outputs()) < 3:
        time.sleep(0.01)
    assert client.predict(api_name="/info")["active_generations"] == 1
    job.cancel()
    deadline = time.monotonic() + 60  # a bound on waiting; how fast it stops: tests/test_batching.py counts steps
    while client.predict(api_name="/info")["active_generations"]:
        assert time.monotonic() < deadline, "the generation went on after Stop"
        time.sleep(0.02)
    assert client.predict("Hi", "Assistant reply", *GREEDY.values(), api_name="/generate") is not None


def test_the_decoder_compiles_in_the_background_while_the_app_serves(tiny_adapter, hello_reply):
    """DECODER_COMPILE=1, the Space's default: requests are answered (eagerly) while the step compiles, /info says
    when it is done, and the compiled step gives the same greedy reply as a direct generate, alone and for two
    users at once (rows that meet decode together, in the graph for several rows)."""
    with running_app(tiny_adapter, DECODER="fp32", DECODER_COMPILE="1") as (url, proc):
        client = Client(url, verbose=False)
        meanwhile = client.predict("Hello there", "Assistant reply", *GREEDY.values(), api_name="/generate")
        wait_until_compiled(url, timeout=600)
        compiled = client.predict("Hello there", "Assistant reply", *GREEDY.values(), api_name="/generate")
        jobs = [Client(url, verbose=False).submit("Hello there", "Assistant reply", *GREEDY.values(),
                                                  api_name="/generate") for _ in range(2)]  # fmt: skip
        together = [job.result(timeout=120) for job in jobs]
        assert "Compiled the decoders in" in proc.log_path.read_text()
    assert compiled == meanwhile == hello_reply
    assert together == [hello_reply] * 2


def test_a_full_queue_answers_busy(tiny_adapter):
    with running_app(tiny_adapter, QUEUE_MAX_SIZE="1", CONCURRENCY="1") as (url, _):
        client = Client(url, verbose=False)
        long = {**GREEDY, "max_new_tokens": 1024, "repetition_penalty": 1.3}
        jobs = [client.submit("Once", "Continue text", *long.values(), api_name="/generate") for _ in range(4)]
        errors = []
        for job in jobs:
            try:
                job.result(timeout=120)
            except Exception as e:  # noqa: BLE001 - we assert on the message below
                errors.append(str(e))
        assert errors and all("Queue is full" in e for e in errors), errors
        assert len(errors) < len(jobs)


@pytest.mark.slow
def test_the_default_embedded_space_answers_sensibly():
    with running_app("embedded") as (url, _):
        client = Client(url, verbose=False)
        reply = client.predict("What is the capital of France?", "Assistant reply", *GREEDY.values(),
                               api_name="/generate")  # fmt: skip
        assert "Paris" in reply
        info = client.predict(api_name="/info")
        assert info["model"] == "embedded" and info["parameters"] == 134_515_008 and info["decoder"] == "int4"


def test_the_example_client_script_runs_against_the_app(app):
    import subprocess
    import sys

    from tests.server import ROOT

    proc = subprocess.run([sys.executable, "examples/client.py", app[0]], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "The DPO model prefers" in proc.stdout and "active_generations" in proc.stdout
