"""HH-RLHF file reading, row conversion, skipping and the held-out split."""

import gzip
import json

import pytest

from tests.conftest import FIXTURE_HH
from train.data import convert_rows, read_jsonl, split_train_eval

GOOD = {"chosen": "\n\nHuman: Q\n\nAssistant: Yes.", "rejected": "\n\nHuman: Q\n\nAssistant: No."}


class NoTemplate:
    chat_template = None


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_convert_formats_hh_text_for_a_model_without_chat_template():
    rows, stats = convert_rows([(1, GOOD)], NoTemplate(), "mem")
    assert rows == [{"prompt": "\n\nHuman: Q\n\nAssistant:", "chosen": " Yes.", "rejected": " No."}]
    assert stats.kept == 1 and not stats.skipped


def test_convert_uses_the_chat_template_when_the_model_has_one(embedded_tokenizer):
    rows, _ = convert_rows([(1, GOOD)], embedded_tokenizer, "mem")
    assert rows[0]["prompt"].endswith("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
    assert (rows[0]["chosen"], rows[0]["rejected"]) == ("Yes.", "No.")


def test_bad_row_error_names_the_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps({"chosen": "no marker", "rejected": "x"})])
    with pytest.raises(ValueError, match=r"d\.jsonl, row 2: no '\\n\\nAssistant:' marker.*skip_bad_rows"):
        convert_rows(read_jsonl(path), NoTemplate(), str(path))


def test_not_json_and_missing_keys_are_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{oops", json.dumps({"chosen": "x"}), "[1, 2]"])
    rows = list(read_jsonl(path))
    with pytest.raises(ValueError, match=r"row 1: not JSON"):
        convert_rows(rows, NoTemplate(), "d.jsonl")
    with pytest.raises(ValueError, match=r"row 2: missing or non-string 'rejected'"):
        convert_rows(rows[1:], NoTemplate(), "d.jsonl")
    with pytest.raises(ValueError, match=r"row 3: not a JSON object"):
        convert_rows(rows[2:], NoTemplate(), "d.jsonl")


def test_skip_bad_rows_counts_each_reason_and_drops_identical_pairs(tmp_path):
    identical = {"chosen": "\n\nHuman: Q\n\nAssistant: Same", "rejected": "\n\nHuman: Q\n\nAssistant: Same"}
    lines = [json.dumps(GOOD), "{oops", json.dumps(identical), json.dumps({"chosen": "x", "rejected": "y"})]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    rows, stats = convert_rows(read_jsonl(path), NoTemplate(), "d", skip_bad_rows=True)
    assert len(rows) == stats.kept == 1
    assert stats.skipped["identical chosen and rejected replies"] == 1
    assert sum(stats.skipped.values()) == 3


def test_identical_pairs_are_dropped_even_without_skipping():
    identical = {"chosen": "\n\nHuman: Q\n\nAssistant: Same", "rejected": "\n\nHuman: Q\n\nAssistant: Same"}
    rows, stats = convert_rows([(1, identical), (2, GOOD)], NoTemplate(), "mem")
    assert len(rows) == 1 and stats.skipped == {"identical chosen and rejected replies": 1}


def test_reads_gzip_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n")
    assert [n for n, _ in read_jsonl(path)] == [1, 3]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


def test_split_is_deterministic_disjoint_and_complete():
    rows = list(range(100))
    train, held = split_train_eval(rows, 0.1, seed=42)
    assert (train, held) == split_train_eval(rows, 0.1, seed=42)
    assert len(held) == 10 and sorted(train + held) == rows
    assert held != split_train_eval(rows, 0.1, seed=7)[1]


def test_split_rejects_a_bad_fraction():
    with pytest.raises(ValueError, match="eval_fraction"):
        split_train_eval([1, 2], 1.0, seed=0)


def test_fixture_file_is_all_valid():
    rows, stats = convert_rows(read_jsonl(FIXTURE_HH), NoTemplate(), "fixture")
    assert stats.kept == len(rows) == 16


def test_real_file_skips_exactly_its_known_bad_rows(real_hh):
    rows, stats = convert_rows(read_jsonl(real_hh), NoTemplate(), "real", skip_bad_rows=True)
    assert stats.kept == 1992 and len(rows) == 1992
    assert stats.skipped == {
        "empty chosen reply after the last assistant turn": 4,
        "'rejected' does not share the dialogue of 'chosen' up to its last assistant turn": 4,
    }


FIXTURE_PANDALM = FIXTURE_HH.parent / "pandalm_tiny.json"


def test_pandalm_keeps_unanimous_verdicts_in_chat_form():
    from train.data import pandalm_pair, pandalm_verdict

    item = {"instruction": "Add the numbers.", "input": "2 and 3", "response1": "23", "response2": " 5 ",
            "annotator1": 2, "annotator2": 2, "annotator3": 2}  # fmt: skip
    assert pandalm_verdict(item) == 2
    assert pandalm_pair(item) == {
        "messages": [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}],
        "chosen": "5",
        "rejected": "23",
    }
    assert pandalm_verdict(item | {"annotator3": 1}) is None  # split
    assert pandalm_verdict(item | {"annotator1": 0, "annotator2": 0, "annotator3": 0}) is None  # a tie
    assert pandalm_pair(item | {"response1": ""}) is None  # nothing to prefer against


def test_convert_pandalm_formats_like_hh_and_counts_what_it_drops(embedded_tokenizer):
    from train.data import convert_pandalm, read_json_list

    rows = convert_pandalm(read_json_list(FIXTURE_PANDALM), embedded_tokenizer, "fixture")
    assert len(rows) == 6  # 8 items: one split verdict, one empty reply
    assert rows[0]["prompt"].endswith("<|im_start|>user\nName a colour of the sky.<|im_end|>\n<|im_start|>assistant\n")
    assert (rows[0]["chosen"], rows[0]["rejected"]) == ("Blue.", "Sky.")
    assert (rows[1]["chosen"], rows[1]["rejected"]) == ("5", "23")


def test_a_helpful_file_that_is_not_pandalm_is_named(tmp_path):
    from train.data import read_json_list

    with pytest.raises(ValueError, match="does not exist or is not .json"):
        read_json_list(tmp_path / "missing.json")
    path = tmp_path / "d.json"
    path.write_text('{"instruction": "x"}')
    with pytest.raises(ValueError, match="expected a JSON list of PandaLM items, got dict"):
        read_json_list(path)


def test_helpful_pairs_join_the_training_pairs_and_keep_their_own_held_out_share(embedded_tokenizer):
    from train.dpo import ScriptArguments, load_helpful_pairs, load_pairs

    script = ScriptArguments(dataset_name=str(FIXTURE_HH), eval_fraction=0.25,
                             helpful_dataset_name=str(FIXTURE_PANDALM), helpful_eval_fraction=0.5)  # fmt: skip
    train_help, held_help = load_helpful_pairs(script, embedded_tokenizer, 42)
    assert len(train_help) == len(held_help) == 3 and not {r["prompt"] for r in train_help} & {
        r["prompt"] for r in held_help}  # fmt: skip
    train, evaluation = load_pairs(script, embedded_tokenizer, 42)
    assert len(train) == 12 + 3 and len(evaluation) == 4  # the eval rows stay HH's alone
    assert [r["prompt"] for r in train][-3:] == [r["prompt"] for r in train_help]
