"""The Arena and the feedback store: votes through the real app, nothing lost or forged under concurrency and
``kill -9``, a migrated schema, and the export that the next round trains on."""

import json
import os
import signal
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gradio_client import Client

from dpo_space.feedback import FILE, MIGRATIONS, FeedbackStore, Vote, migrate, read_rows
from tests.server import running_app

GREEDY = [8, 0.0, 1.0, 0, 1.0, 0, 0]


def a_vote(round_id: str, choice: str = "A", policy_side: str = "A") -> Vote:
    return Vote(round_id, "session-hash", "dpo", "ref", "abc123", policy_side, {"seed": 0},
                [{"role": "user", "content": "Hi"}], "reply A", "reply B", choice)  # fmt: skip


def test_a_vote_is_stored_once_and_counted_on_the_scoreboard(tmp_path):
    store = FeedbackStore(tmp_path, salt="s")
    store.add_vote(a_vote("r1", "A", policy_side="A"))  # the DPO model won
    store.add_vote(a_vote("r2", "A", policy_side="B"))  # the reference won
    store.add_vote(a_vote("r3", "tie"))
    with pytest.raises(ValueError, match="has its vote already"):
        store.add_vote(a_vote("r1", "B"))
    with pytest.raises(ValueError, match="must be one of A, B, tie, both_bad"):
        store.add_vote(a_vote("r4", "C"))
    board = store.scoreboard()
    assert {k: board[k] for k in ("votes", "dpo_wins", "reference_wins", "ties", "both_bad")} == {
        "votes": 3, "dpo_wins": 1, "reference_wins": 1, "ties": 1, "both_bad": 0}  # fmt: skip
    assert board["dpo_win_rate"] == 0.5 and 0 < board["ci95"][0] < 0.5 < board["ci95"][1] < 1
    assert store.session_hash("abc") == store.session_hash("abc") != FeedbackStore(tmp_path / "o", "t").session_hash(
        "abc")  # fmt: skip


def test_an_old_schema_is_migrated_and_keeps_its_rows(tmp_path):
    db = sqlite3.connect(tmp_path / FILE, isolation_level=None)
    for statement in filter(str.strip, MIGRATIONS[0].split(";")):
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO thumbs (rated_at, session, model, adapter_hash, conversation, reply, liked) "
               "VALUES (1.0, 's', 'm', 'h', '[]', 'r', 1)")  # fmt: skip
    db.close()
    store = FeedbackStore(tmp_path, salt="s")
    (version,) = store._db.execute("PRAGMA user_version").fetchone()
    indexes = {row[1] for row in store._db.execute("PRAGMA index_list(votes)")}
    assert version == len(MIGRATIONS) == 2 and "votes_by_session_time" in indexes
    assert read_rows(tmp_path / FILE)[1][0]["reply"] == "r"
    store._db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(ValueError, match="newer than this code knows"):
        migrate(store._db)


def test_feedback_stays_local_unless_a_reachable_hub_dataset_is_configured(tmp_path, caplog, monkeypatch):
    from dpo_space.feedback import start_hub_sync

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    secret = "hf_neverLogThisToken0123456789"
    with caplog.at_level("INFO"):
        assert start_hub_sync(tmp_path, None, secret) is None
        assert start_hub_sync(tmp_path, "me/votes", None) is None
        assert start_hub_sync(tmp_path, "me/votes", secret) is None  # this machine reaches no Hub
    assert caplog.text.count("Feedback stays in") == 2 and "Feedback stays local: pushing to the Hub" in caplog.text
    assert secret not in caplog.text


@pytest.fixture(scope="module")
def arena_app(tiny_adapter, tmp_path_factory):
    folder = tmp_path_factory.mktemp("feedback")
    with running_app(tiny_adapter, DECODER="fp32", FEEDBACK_DIR=str(folder), ARENA_MIN_SECONDS="0",
                     QUEUE_MAX_SIZE="64") as (url, proc):  # fmt: skip
        yield url, folder


def play(client: Client, prompt: str = "Hello", choice: str = "A", settings=GREEDY) -> tuple[str, dict]:
    round_id, reply_a, reply_b = client.submit(prompt, *settings, api_name="/arena").result(timeout=600)
    revealed, board = client.submit(round_id, choice, api_name="/vote").result(timeout=600)
    return revealed, {"round_id": round_id, "A": reply_a, "B": reply_b, "board": board}


@pytest.mark.slow
def test_a_round_streams_two_anonymous_replies_and_a_vote_reveals_them(arena_app):
    url, folder = arena_app
    client = Client(url, verbose=False)
    revealed, seen = play(client, "Hello", "B")
    assert "the DPO model" in revealed and "the reference" in revealed
    votes, _ = read_rows(folder / FILE)
    stored = next(v for v in votes if v["round_id"] == seen["round_id"])
    assert (stored["reply_a"], stored["reply_b"], stored["vote"]) == (seen["A"], seen["B"], "B")
    assert stored["conversation"] == [{"role": "user", "content": "Hello"}] and stored["settings"]["seed"] == 0
    assert len(stored["session"]) == 32 and stored["session"] != client.session_hash  # a salted hash
    assert Client(url, verbose=False).predict(api_name="/info")["arena"]["votes"] >= 1


@pytest.mark.slow
def test_votes_that_cannot_count_are_refused_clearly(arena_app):
    url, _ = arena_app
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="unknown round"):
        client.predict("0123456789abcdef", "A", api_name="/vote")
    revealed, seen = play(client)
    with pytest.raises(Exception, match="has its vote already"):
        client.predict(seen["round_id"], "B", api_name="/vote")
    with pytest.raises(Exception, match="unknown round"):  # another session cannot vote on this one's round
        round_id = client.predict("Hi", *GREEDY, api_name="/arena")[0]
        Client(url, verbose=False).predict(round_id, "A", api_name="/vote")
    with pytest.raises(Exception, match="must be one of A, B, tie, both_bad"):
        client.predict(round_id, "C", api_name="/vote")
    job = client.submit("Once upon a time", 1024, 0.0, 1.0, 0, 1.3, 0, 0, api_name="/arena")
    while not job.outputs():
        pass
    with pytest.raises(Exception, match="still coming"):
        client.predict(job.outputs()[0][0], "A", api_name="/vote")
    job.cancel()


@pytest.mark.slow
def test_a_session_voting_faster_than_a_person_is_refused(tiny_adapter, tmp_path):
    with running_app(tiny_adapter, DECODER="fp32", FEEDBACK_DIR=str(tmp_path), ARENA_MIN_SECONDS="60") as (url, _):
        client = Client(url, verbose=False)
        play(client)
        with pytest.raises(Exception, match="faster than a person"):
            play(client)
    assert len(read_rows(tmp_path / FILE)[0]) == 1


@pytest.mark.slow
def test_32_concurrent_voters_each_get_an_answer_and_every_vote_is_stored_once(arena_app):
    url, folder = arena_app
    before = {v["round_id"] for v in read_rows(folder / FILE)[0]}
    # 32 sessions; a join of the queue may wait for the busy 2-core server longer than httpx's 5 s default
    clients = [Client(url, verbose=False, httpx_kwargs={"timeout": 120}) for _ in range(32)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: play(clients[i], f"Question {i}", "AB"[i % 2]), range(32)))
    stored = [v["round_id"] for v in read_rows(folder / FILE)[0] if v["round_id"] not in before]
    assert sorted(stored) == sorted(seen["round_id"] for _, seen in results) and len(set(stored)) == 32


@pytest.mark.slow
def test_kill_9_while_voting_loses_no_acknowledged_vote(tiny_adapter, tmp_path):
    acknowledged, stop = [], threading.Event()

    def voter(url):
        client = Client(url, verbose=False)
        while not stop.is_set():
            try:
                _, seen = play(client)
            except Exception:  # noqa: BLE001 - the server died mid-call: that vote was never acknowledged
                return
            acknowledged.append(seen["round_id"])

    with running_app(tiny_adapter, DECODER="fp32", FEEDBACK_DIR=str(tmp_path), ARENA_MIN_SECONDS="0") as (url, proc):
        threads = [threading.Thread(target=voter, args=(url,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        while len(acknowledged) < 12:
            assert proc.poll() is None
            threading.Event().wait(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        stop.set()
        for thread in threads:
            thread.join(60)
    db = sqlite3.connect(tmp_path / FILE)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = {row[0] for row in db.execute("SELECT round_id FROM votes")}
    assert set(acknowledged) <= stored


@pytest.mark.slow
def test_exported_votes_train_the_tiny_recipe(arena_app, tmp_path):
    from train.dpo import main as train
    from train.feedback import main as export

    url, folder = arena_app
    client = Client(url, verbose=False)
    for i in range(8):  # sampled: the tiny model's greedy reply is often empty (an empty pair is left out)
        play(client, f"Hello number {i}", "AB"[i % 2], settings=[16, 1.0, 1.0, 0, 1.0, 0, i])
    summary = export(["export", str(tmp_path / "export"), "--feedback_dir", str(folder)])
    rows = [json.loads(line) for line in (tmp_path / "export" / "preferences.jsonl").read_text().splitlines()]
    assert len(rows) == summary["preferences"] >= 2 and summary["votes"] == len(rows) + sum(
        summary["left_out"].values())  # fmt: skip
    assert rows[0]["prompt"][-1]["role"] == "user" and rows[0]["chosen"][0]["role"] == "assistant"
    exported = str(tmp_path / "export" / "preferences.jsonl")
    tiny = ["--config", str(Path(__file__).parent.parent / "train/recipes/tiny.yaml"), "--max_steps", "1"]
    train([*tiny, "--output_dir", str(tmp_path / "alone"), "--dataset_name", exported, "--eval_fraction", "0"])
    train([*tiny, "--output_dir", str(tmp_path / "mixed"), "--extra_dataset_files", exported])  # beside HH
    usable = len([r for r in rows if r["chosen"] != r["rejected"]])
    alone, mixed = (json.loads((tmp_path / run / "train_results.json").read_text()) for run in ("alone", "mixed"))
    assert alone["train_pairs"] == usable and mixed["train_pairs"] == 12 + usable  # the tiny HH file's 12


def test_pushed_shards_export_like_the_database(tmp_path):
    from dpo_space.feedback import VOTE_COLUMNS
    from train.feedback import export

    shards = tmp_path / "snapshot" / "data"
    shards.mkdir(parents=True)
    vote = a_vote("r1", "B", policy_side="A")
    row = (vote.round_id, 1.0, vote.session, vote.policy_model, vote.reference_model, vote.adapter_hash,
           vote.policy_side, json.dumps(vote.settings), json.dumps(vote.conversation), vote.reply_a, vote.reply_b,
           vote.vote)  # fmt: skip
    (shards / "votes-0a1b.jsonl").write_text(json.dumps(dict(zip(VOTE_COLUMNS, row, strict=True))) + "\n")
    assert export(tmp_path / "snapshot", tmp_path / "out")["preferences"] == 1
    exported = json.loads((tmp_path / "out" / "preferences.jsonl").read_text())
    assert exported["chosen"] == [{"role": "assistant", "content": "reply B"}] and exported["chosen_model"] == "ref"
    assert exported["rejected"] == [{"role": "assistant", "content": "reply A"}]
    assert exported["prompt"] == [{"role": "user", "content": "Hi"}]


@pytest.mark.slow
def test_votes_reach_a_configured_hub_dataset_by_shutdown_and_the_token_stays_out_of_the_log(tiny_adapter, tmp_path):
    from tests.hub_stub import running_hub_stub
    from train.feedback import read_feedback

    secret = "hf_neverLogThisToken0123456789"
    with running_hub_stub() as (hub, endpoint):
        with running_app(tiny_adapter, DECODER="fp32", FEEDBACK_DIR=str(tmp_path / "feedback"), ARENA_MIN_SECONDS="0",
                         FEEDBACK_REPO="me/votes", HF_TOKEN=secret, HF_ENDPOINT=endpoint,
                         HF_HUB_OFFLINE="0") as (url, proc):  # fmt: skip
            _, seen = play(Client(url, verbose=False), "Hello", "B")
        # leaving running_app sends SIGTERM, as a Space restart does; the scheduler's next push is minutes away
        log = proc.log_path.read_text()
    assert "pushed to the Hub dataset me/votes" in log and secret not in log
    assert hub.unexpected == [] and {auth for _, path, auth in hub.requests if path.startswith("/api/datasets")} == {
        f"Bearer {secret}"
    }
    pushed = hub.files["me/votes"]
    assert [path.split("-")[0] for path in pushed] == ["data/votes"]
    snapshot = tmp_path / "snapshot"
    for path, content in pushed.items():
        (snapshot / path).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / path).write_text(content)
    pushed_votes, _ = read_feedback(snapshot)
    assert pushed_votes == read_rows(tmp_path / "feedback" / FILE)[0]  # the pushed shard holds the stored vote
    assert [(v["round_id"], v["reply_a"], v["reply_b"], v["vote"]) for v in pushed_votes] == [
        (seen["round_id"], seen["A"], seen["B"], "B")
    ]
