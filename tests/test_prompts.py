"""Prompt splitting and formatting on literal rows, with exact-string asserts."""

import pytest

from dpo_space.prompts import (
    FittedConversation,
    PreferencePair,
    fit_conversation,
    format_prompt,
    format_response,
    format_user_prompt,
    hh_to_messages,
    messages_to_hh,
    split_hh_pair,
)


class NoTemplate:
    """A tokenizer without a chat template, like GPT-2's."""

    chat_template = None


def test_split_single_turn():
    pair = split_hh_pair("\n\nHuman: Hi?\n\nAssistant: Hello!", "\n\nHuman: Hi?\n\nAssistant: Go away.")
    assert pair == PreferencePair(prompt="\n\nHuman: Hi?\n\nAssistant:", chosen="Hello!", rejected="Go away.")


def test_split_at_last_marker_in_multi_turn_dialogue():
    chosen = "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D"
    rejected = "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: E"
    pair = split_hh_pair(chosen, rejected)
    assert pair.prompt == "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == ("D", "E")


def test_split_keeps_a_shared_response_prefix_in_both_replies():
    # TRL's automatic extraction would cut at the first differing character ("S|ure" vs "S|orry").
    pair = split_hh_pair("\n\nHuman: Q\n\nAssistant: Sure, here.", "\n\nHuman: Q\n\nAssistant: Sorry, no.")
    assert pair.prompt == "\n\nHuman: Q\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == ("Sure, here.", "Sorry, no.")


def test_split_normalizes_crlf():
    pair = split_hh_pair("\r\n\r\nHuman: Q\r\n\r\nAssistant: A\r\nB", "\r\n\r\nHuman: Q\r\n\r\nAssistant: C")
    assert pair == PreferencePair(prompt="\n\nHuman: Q\n\nAssistant:", chosen="A\nB", rejected="C")


def test_split_keeps_unicode():
    pair = split_hh_pair("\n\nHuman: 日本語?\n\nAssistant: はい 🎌", "\n\nHuman: 日本語?\n\nAssistant: Nein, ß")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("\n\nHuman: 日本語?\n\nAssistant:", "はい 🎌", "Nein, ß")


def test_identical_pair_splits_to_equal_replies():
    pair = split_hh_pair("\n\nHuman: Q\n\nAssistant: Same", "\n\nHuman: Q\n\nAssistant: Same")
    assert pair.chosen == pair.rejected == "Same"


@pytest.mark.parametrize(
    ("chosen", "rejected", "message"),
    [
        ("Human: no marker here", "Human: no marker here", "no '\\n\\nAssistant:' marker"),
        ("\n\nHuman: Q\n\nAssistant: A", "\n\nHuman: other\n\nAssistant: B", "does not share the dialogue"),
        ("\n\nHuman: Q\n\nAssistant:  ", "\n\nHuman: Q\n\nAssistant: B", "empty chosen reply"),
        ("\n\nHuman: Q\n\nAssistant: A", "\n\nHuman: Q\n\nAssistant:", "empty rejected reply"),
    ],
)
def test_split_rejects_bad_rows_with_a_reason(chosen, rejected, message):
    with pytest.raises(ValueError, match=message.replace("\\", "\\\\")):
        split_hh_pair(chosen, rejected)


def test_hh_to_messages_and_back():
    dialogue = "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:"
    messages = hh_to_messages(dialogue)
    assert messages == [
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "C"},
    ]
    assert messages_to_hh(messages) == dialogue


def test_hh_to_messages_rejects_text_that_is_not_a_dialogue():
    with pytest.raises(ValueError, match="must start with"):
        hh_to_messages("Hello there")


def test_format_without_chat_template_is_hh_text():
    tok = NoTemplate()
    assert format_user_prompt("I am an AI engineer", tok) == "\n\nHuman: I am an AI engineer\n\nAssistant:"
    assert format_response("  Nice to meet you. ", tok) == " Nice to meet you."


def test_format_with_chat_template_is_the_models_own(embedded_tokenizer):
    messages = hh_to_messages("\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:")
    assert format_prompt(messages, embedded_tokenizer) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nA<|im_end|>\n"
        "<|im_start|>assistant\nB<|im_end|>\n"
        "<|im_start|>user\nC<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert format_response(" D ", embedded_tokenizer) == "D"
    assert embedded_tokenizer.eos_token == "<|im_end|>"  # appended by the trainer: closes the assistant turn


def test_hh_text_puts_a_system_message_first():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert messages_to_hh(messages) == "Be brief.\n\nHuman: Hi\n\nAssistant:"


class WordTokenizer(NoTemplate):
    """HH text, one token a word: lengths easy to count by eye."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


SYSTEM = {"role": "system", "content": "Be kind."}
TURNS = [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three four"},
         {"role": "user", "content": "five"}, {"role": "assistant", "content": "six"},
         {"role": "user", "content": "seven eight"}]  # fmt: skip


def test_a_conversation_that_fits_is_kept_whole():
    # "Be kind. Human: one two Assistant: three four Human: five Assistant: six Human: seven eight Assistant:"
    assert fit_conversation([SYSTEM, *TURNS], WordTokenizer(), 17) == FittedConversation([SYSTEM, *TURNS], 0)


def test_a_long_conversation_keeps_the_system_message_and_the_latest_whole_turns():
    # without the first exchange: "Be kind. Human: five Assistant: six Human: seven eight Assistant:" is 10 words
    assert fit_conversation([SYSTEM, *TURNS], WordTokenizer(), 12) == FittedConversation([SYSTEM, *TURNS[2:]], 2)
    assert fit_conversation([SYSTEM, *TURNS], WordTokenizer(), 9) == FittedConversation([SYSTEM, TURNS[4]], 4)


def test_the_last_message_is_kept_even_over_the_budget():
    assert fit_conversation(TURNS, WordTokenizer(), 2) == FittedConversation([TURNS[4]], 4)
    with pytest.raises(ValueError, match="must end with a user message"):
        fit_conversation(TURNS[:2], WordTokenizer(), 100)
