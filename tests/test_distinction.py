import functools
import gzip
import json
import logging
import re
from difflib import SequenceMatcher
from pathlib import Path

import pytest

from tests.conftest import ROOT
from train.distinction import (
    BORDERLINE_FILE,
    QUESTIONS_FILE,
    first_per_instruction,
    first_sentence,
    harmful_dialogues,
    harmful_openers,
    harmful_request,
    harmful_row,
    harmless_row,
    read_questions,
    refusal_reply,
    training_pairs,
    usable_answer,
)
from train.refusals import named_refusal

USER = [{"role": "user", "content": "Can you give me Senator Smith's home address?"}]


def test_first_sentence_ends_at_the_first_stop_before_a_space():
    assert first_sentence("I can't help with that. Ask someone else.") == "I can't help with that."
    assert first_sentence("  Really? Yes.") == "Really?"
    assert first_sentence("Version 3.5 is out") == "Version 3.5 is out"
    assert first_sentence("No stop at all ") == "No stop at all"


def test_refusal_reply_is_the_prefix_and_the_rest_of_its_first_sentence():
    assert refusal_reply("provide the home address for Senator Smith. I'm a chatbot.") == (
        "I'm sorry, but I can't provide the home address for Senator Smith."
    )
    assert refusal_reply(". Anything else?") == "I'm sorry, but I can't."
    assert refusal_reply("") == "I'm sorry, but I can't."
    assert refusal_reply("help with that", prefix="No, I won't") == "No, I won't help with that"


def test_harmful_dialogues_are_those_where_the_preferred_reply_refuses_and_the_other_does_not():
    pairs = [
        (USER, "I'm sorry, I don't have that address.", "It is 12 Elm Street."),
        (USER, "Sure, it is 12 Elm Street.", "I'm sorry, I can't."),
        (USER, "I'm sorry, no.", "I can't do that."),
        (USER, "Paris.", "Lyon."),
    ]
    assert harmful_dialogues(pairs) == [(USER, "It is 12 Elm Street.")]


def test_a_harmful_row_prefers_the_refusal_to_the_models_own_compliance_or_else_hh_rejected_reply():
    refusal = "I'm sorry, but I can't share someone's home address."
    row = harmful_row(USER, refusal, "His address is 12 Elm Street.", "It is 12 Elm Street.")
    assert row == {"prompt": USER, "chosen": [{"role": "assistant", "content": refusal}],
                   "rejected": [{"role": "assistant", "content": "His address is 12 Elm Street."}],
                   "kind": "harmful"}  # fmt: skip
    row = harmful_row(USER, refusal, "I'm sorry, I don't know it.", "It is 12 Elm Street.")
    assert row["rejected"] == [{"role": "assistant", "content": "It is 12 Elm Street."}]
    assert harmful_row(USER, refusal, "  ", "It is 12 Elm Street.")["rejected"][0]["content"] == "It is 12 Elm Street."
    assert harmful_row(USER, "Here it is.", "His address is 12 Elm Street.", "It is 12 Elm Street.") is None
    assert harmful_row(USER, refusal, "I'm sorry, I don't know it.") is None  # an opener: no HH reply to reject


def test_harmful_request_needs_a_request_and_a_harm_word_and_no_word_of_prevention():
    assert harmful_request("How can I rob a casino?")
    assert harmful_request("What's the best way to poison someone?")
    assert harmful_request("Can you help me hack into government websites?")
    assert harmful_request("Teach me how to do crystal meth")
    assert not harmful_request("How do I get a sex robot?")  # "rob" only as a word
    assert not harmful_request("How do I avoid scammers online?")
    assert not harmful_request("How do I spot a fake check?")
    assert not harmful_request("Why do people steal?")  # no request
    assert not harmful_request("What is the best way to learn French?")  # no harm word
    assert not harmful_request("How can I steal a car? " + "Please tell me. " * 20)  # longer than one short turn


def test_harmful_openers_are_the_distinct_matching_first_turns_in_order():
    def pair(*turns):
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)], "a", "b"

    pairs = [
        pair("How do I steal a car?", "Why?", "I want one."),
        pair("Name a colour."),
        pair("How can I rob a bank?"),
        pair(" How do I steal a car? "),
        pair("How do I hack a phone?"),
    ]
    assert harmful_openers(pairs) == ["How do I steal a car?", "How can I rob a bank?", "How do I hack a phone?"]
    assert harmful_openers(pairs, exclude={"How can I rob a bank?"}) == ["How do I steal a car?",
                                                                          "How do I hack a phone?"]  # fmt: skip


def test_a_harmless_row_prefers_the_answer_to_the_refusal():
    messages = [{"role": "user", "content": "Name a primary colour."}]
    assert harmless_row(messages, "Red.", "I'm sorry, but I can't name colours.") == {
        "prompt": messages,
        "chosen": [{"role": "assistant", "content": "Red."}],
        "rejected": [{"role": "assistant", "content": "I'm sorry, but I can't name colours."}],
        "kind": "harmless",
    }


def test_first_per_instruction_keeps_each_instructions_first_pair():
    def pair(instruction, chosen):
        return {"messages": [{"role": "user", "content": instruction}], "chosen": chosen, "rejected": "x"}

    pairs = [pair("a", "1"), pair("b", "2"), pair("a", "3"), pair("c", "4"), pair("b", "5")]
    assert [p["chosen"] for p in first_per_instruction(pairs)] == ["1", "2", "4"]


def test_training_pairs_read_only_the_training_splits(tmp_path):
    hh = tmp_path / "hh.jsonl.gz"
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: I'm sorry, no.",
             "rejected": f"\n\nHuman: q{i}\n\nAssistant: Yes {i}."} for i in range(10)]  # fmt: skip
    rows.append({"chosen": "no assistant turn", "rejected": "x"})
    with gzip.open(hh, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    pandalm = tmp_path / "pandalm.json"
    items = [{"instruction": f"task {i}", "input": "", "response1": "good", "response2": "bad",
              "annotator1": 1, "annotator2": 1, "annotator3": 1} for i in range(5)]  # fmt: skip
    items.append({"instruction": "split", "response1": "a", "response2": "b", "annotator1": 1, "annotator2": 2,
                  "annotator3": 1})  # fmt: skip
    pandalm.write_text(json.dumps(items))

    hh_train, pandalm_train = training_pairs(str(hh), 0.2, str(pandalm), 0.2, seed=42)

    from train.data import split_train_eval

    train_rows, held_out_rows = split_train_eval(list(read_numbered(rows)), 0.2, 42)  # as train.dpo splits the file
    held_out = {r["chosen"].split("Assistant")[0] for _, r in held_out_rows}
    assert len(held_out) == 2
    assert len(hh_train) == sum(r["chosen"] != "no assistant turn" for _, r in train_rows)
    assert [m[0]["content"] for m, _, _ in hh_train] == [
        r["chosen"].split("Human: ")[1].split("\n")[0] for _, r in train_rows if r["chosen"] != "no assistant turn"
    ]
    assert all(f"\n\nHuman: {m[0]['content']}\n\n" not in held_out for m, _, _ in hh_train)
    assert len(pandalm_train) == 4  # 5 unanimous items, 1 held out; the split verdict is not a pair
    assert all(p["chosen"] == "good" for p in pandalm_train)


def read_numbered(rows):
    return enumerate(rows, start=1)


def test_read_questions_leaves_out_comments_and_blank_lines(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("# a comment\nHow do I boil an egg?\n\n  # indented comment\n  Why is the sky blue?  \n")
    assert read_questions(path) == ["How do I boil an egg?", "Why is the sky blue?"]


def test_a_usable_answer_neither_refuses_nor_loops():
    assert usable_answer("Boil it for six minutes, then cool it in cold water.")
    assert not usable_answer("I'm sorry, but I can't help with eggs.")
    assert not usable_answer("   ")
    assert not usable_answer("boil the egg " * 10)


XSTEST = ROOT.parent / "shared" / "data" / "xstest" / "xstest_prompts.csv"


QUESTION_FILES = sorted((ROOT / "train" / "prompts").glob("*.txt"))


def test_the_question_files_are_found_and_ask_each_question_once():
    assert {path.name for path in QUESTION_FILES} >= {Path(QUESTIONS_FILE).name, Path(BORDERLINE_FILE).name}
    questions = [q for path in QUESTION_FILES for q in read_questions(path)]
    assert len(questions) == len(set(questions))


@functools.cache
def words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def near_copy(question: str, prompts: list[str]) -> str | None:
    """The prompt of which ``question`` is a light edit (case, punctuation, a word or two), if any."""
    matcher = SequenceMatcher(None, b=words(question))  # b is the side SequenceMatcher indexes once
    for prompt in prompts:
        matcher.set_seq1(words(prompt))  # the quick ratios bound ratio() from above: most prompts stop there
        if matcher.real_quick_ratio() >= 0.9 and matcher.quick_ratio() >= 0.9 and matcher.ratio() >= 0.9:
            return prompt
    return None


def test_near_copy_catches_a_light_edit_and_not_a_shared_word():
    prompts = ["How can I kill a Python process?"]
    assert near_copy("how can I kill a python process", prompts) == prompts[0]
    assert near_copy("How can I kill a Python processes?", prompts) == prompts[0]
    assert near_copy("How do I kill a frozen program on Windows?", prompts) is None


@pytest.mark.parametrize("path", QUESTION_FILES, ids=lambda path: path.name)
def test_the_written_questions_are_neither_evaluation_prompts_nor_the_shipped_model_tests(path):
    from tests.test_shipped_model import BENIGN

    questions = read_questions(path)
    assert len(questions) == len(set(questions)) >= 50
    assert not [q for q in questions if near_copy(q, BENIGN)]  # the shipped model's test asks what training never saw
    if not XSTEST.is_file():
        pytest.skip(f"XSTest not found at {XSTEST} (it lives in ../shared, never in the repo)")
    from train.behaviour import read_xstest

    xstest = [row["prompt"] for row in read_xstest(XSTEST)]
    assert [(q, p) for q in questions if (p := near_copy(q, xstest))] == []


def write_hh_rows(path: Path) -> Path:
    """Twelve HH rows: four refused requests to hurt, four harmless ones, four dialogues opened by a request to
    steal whose replies neither refuse (so only the opener makes a harmful pair)."""
    rows = [
        {
            "chosen": f"\n\nHuman: How do I hurt person {i}?\n\nAssistant: I'm sorry, I won't help with that.",
            "rejected": f"\n\nHuman: How do I hurt person {i}?\n\nAssistant: Hit them hard.",
        }
        for i in range(4)
    ]
    rows += [{"chosen": f"\n\nHuman: Name a colour, {i}.\n\nAssistant: Blue.",
              "rejected": f"\n\nHuman: Name a colour, {i}.\n\nAssistant: Dunno."} for i in range(4)]  # fmt: skip
    bike = "\n\nHuman: How can I steal bike {}?\n\nAssistant: Why?\n\nHuman: I want it.\n\nAssistant: "
    rows += [{"chosen": bike.format(i) + "Use cutters.", "rejected": bike.format(i) + "Ok."} for i in range(4)]
    # neither reply refuses, so only the opener makes a harmful pair
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_the_command_writes_pairs_that_train_dpo_reads(tmp_path, tiny_path):
    """End to end on the tiny model: the file holds both kinds, in TRL's conversational format, and loads as
    training pairs."""
    from dpo_space.models import load_tokenizer
    from train.data import convert_rows, read_jsonl
    from train.distinction import main

    hh = write_hh_rows(tmp_path / "hh.jsonl")
    questions = tmp_path / "questions.txt"
    questions.write_text("# two questions\nHow do I boil an egg?\nWhy is the sky blue?\n")
    out = tmp_path / "pairs.jsonl"

    written = main(["--out", str(out), "--model", "tiny", "--hh", str(hh), "--hh_eval_fraction", "0.25",
                    "--helpful", str(ROOT / "tests/fixtures/pandalm_tiny.json"), "--helpful_eval_fraction", "0.2",
                    "--questions", str(questions), "--harmful_openers", "--max_new_tokens", "8"])  # fmt: skip

    pandalm = str(ROOT / "tests/fixtures/pandalm_tiny.json")
    hh_train, pandalm_train = training_pairs(str(hh), 0.25, pandalm, 0.2, seed=42)
    harmful = [r for r in written if r["kind"] == "harmful"]
    dialogues = harmful_dialogues(hh_train)
    openers = harmful_openers(hh_train, exclude={m[0]["content"] for m, _ in dialogues if len(m) == 1})
    assert len(dialogues) >= 1 and openers and all("steal bike" in text for text in openers)
    assert len(dialogues) <= len(harmful) <= len(dialogues) + len(openers)  # less the openers the model refuses
    from_openers = [r["prompt"] for r in harmful if "steal bike" in r["prompt"][0]["content"]]
    assert all(len(prompt) == 1 and prompt[0]["content"] in openers for prompt in from_openers)  # one turn, training
    assert all(r["chosen"][0]["content"].startswith("I'm sorry, but I can't") for r in harmful)
    assert all("colour" not in r["prompt"][-1]["content"] for r in harmful)
    harmless = [r for r in written if r["kind"] == "harmless"]
    assert all(r["rejected"][0]["content"].startswith("I'm sorry, but I can't") for r in harmless)
    asked = {"How do I boil an egg?", "Why is the sky blue?"}
    from_pandalm = [r for r in harmless if r["prompt"][-1]["content"] not in asked]
    assert len(from_pandalm) == min(len(harmful), len(first_per_instruction(pandalm_train)))
    assert [json.loads(line) for line in out.read_text().splitlines()] == written
    pairs, stats = convert_rows(read_jsonl(out), load_tokenizer(tiny_path), str(out))
    assert len(pairs) == len(written) and stats.kept == len(written)


@pytest.mark.slow
def test_prompt_files_only_reads_the_written_requests_alone(tmp_path, tiny_path, caplog):
    """``--prompt_files_only``: the written harmful requests and questions are decoded, and HH and PandaLM are not
    read (their paths here do not exist). The tiny model's own replies are empty, so it writes no pair; which pairs a
    reply makes is ``harmful_row``'s and ``harmless_row``'s, tested above on literal replies."""
    from train.distinction import main

    harmful = tmp_path / "harmful.txt"
    harmful.write_text("# requests\nHow do I hurt my neighbour?\nHow can I steal a car?\n")
    questions = tmp_path / "questions.txt"
    questions.write_text("How do I boil an egg?\n")
    out = tmp_path / "pairs.jsonl"
    caplog.set_level(logging.INFO, logger="train.distinction")

    written = main(["--out", str(out), "--model", "tiny", "--hh", str(tmp_path / "absent.jsonl"),
                    "--helpful", str(tmp_path / "absent.json"), "--prompt_files_only",
                    "--harmful_requests", str(harmful), "--questions", str(questions),
                    "--max_new_tokens", "8"])  # fmt: skip

    messages = [r.getMessage() for r in caplog.records]
    assert f"{harmful}: 2 harmful requests" in messages
    assert f"{questions}: 0 of 1 answered without refusing or looping" in messages
    assert not any("HH dialogues" in m for m in messages)
    assert out.is_file() and [json.loads(line) for line in out.read_text().splitlines()] == written


@pytest.mark.slow
def test_named_refusals_put_the_named_harm_in_the_chosen_reply(tmp_path):
    """``--named_refusals``: the harmful pairs prefer ``named_refusal``'s reply, the rest of the file as without."""
    from train.distinction import main

    common = ["--model", "tiny", "--hh", str(write_hh_rows(tmp_path / "hh.jsonl")), "--hh_eval_fraction", "0.25",
              "--helpful", str(ROOT / "tests/fixtures/pandalm_tiny.json"), "--questions", "--harmful_openers",
              "--max_new_tokens", "8"]  # fmt: skip
    plain = main(["--out", str(tmp_path / "plain.jsonl"), *common])
    named = main(["--out", str(tmp_path / "named.jsonl"), "--named_refusals", *common])

    harmful = [r for r in named if r["kind"] == "harmful"]
    assert harmful and all(r["chosen"][0]["content"] == named_refusal(r["prompt"]) for r in harmful)
    assert {r["chosen"][0]["content"].split(".")[0] for r in harmful} <= {
        "I'm sorry, but I can't help with hurting anyone", "I'm sorry, but I can't help with stealing"}  # fmt: skip
    without_chosen = [{**r, "chosen": None} for r in plain]
    assert [{**r, "chosen": None} for r in named] == without_chosen


def test_prompt_files_only_with_hh_openers_is_an_error_that_says_which_to_drop(capsys):
    from train.distinction import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--out", "pairs.jsonl", "--prompt_files_only", "--harmful_openers"])
    assert "--harmful_openers reads HH's training dialogues" in capsys.readouterr().err
    assert parse_args(["--out", "pairs.jsonl", "--prompt_files_only"]).prompt_files_only
