"""Prompt formatting shared by training and the Space.

HH-RLHF dialogues look like ``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:"``.
A model with a chat template is trained and prompted with that dialogue turned into chat messages
(Human -> user, Assistant -> assistant); a model without one (GPT-2) sees the HH text as it is.
``format_prompt`` and ``format_response`` make that decision in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class PreferencePair:
    """One HH row split at the last assistant turn: the shared dialogue and two replies."""

    prompt: str
    chosen: str
    rejected: str


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_hh_pair(chosen: str, rejected: str) -> PreferencePair:
    """Split an HH row at the **last** ``"\\n\\nAssistant:"`` of ``chosen``.

    The prompt keeps the marker; each reply is the text after it, leading space stripped.
    Raises ``ValueError`` saying what is wrong with the row.
    """
    chosen, rejected = normalize_newlines(chosen), normalize_newlines(rejected)
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(f"no {ASSISTANT!r} marker in 'chosen'; HH rows must end with an assistant turn")
    prompt = chosen[: cut + len(ASSISTANT)]
    if not rejected.startswith(prompt):
        raise ValueError("'rejected' does not share the dialogue of 'chosen' up to its last assistant turn")
    chosen_reply = chosen[len(prompt) :].strip()
    rejected_reply = rejected[len(prompt) :].strip()
    if not chosen_reply:
        raise ValueError("empty chosen reply after the last assistant turn")
    if not rejected_reply:
        raise ValueError("empty rejected reply after the last assistant turn")
    return PreferencePair(prompt=prompt, chosen=chosen_reply, rejected=rejected_reply)


def hh_to_messages(dialogue: str) -> list[dict[str, str]]:
    """Turn an HH dialogue into chat messages; a trailing empty assistant turn is dropped."""
    dialogue = normalize_newlines(dialogue)
    if not _TURN.match(dialogue):
        raise ValueError(f"an HH dialogue must start with {HUMAN!r}; got {dialogue[:40]!r}")
    parts = _TURN.split(dialogue)[1:]  # [role, text, role, text, ...]
    pairs = zip(parts[::2], parts[1::2], strict=True)
    messages = [{"role": _ROLES[role], "content": text.strip()} for role, text in pairs]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def messages_to_hh(messages: list[dict[str, str]]) -> str:
    """The HH text of chat messages, ending with an open assistant turn. HH has no system turn: a system message's
    text comes first, as plain text before the dialogue."""
    names = {"user": "Human", "assistant": "Assistant"}
    system = "".join(m["content"].strip() for m in messages if m["role"] == "system")
    text = "".join(f"\n\n{names[m['role']]}: {m['content'].strip()}" for m in messages if m["role"] in names)
    return system + text + ASSISTANT


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(messages: list[dict[str, str]], tokenizer) -> str:
    """The text a model sees before its reply: its chat template if it has one, else HH text."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return messages_to_hh(messages)


def format_response(reply: str, tokenizer) -> str:
    """The text of a reply as the model should produce it after ``format_prompt``.

    Chat models close the turn with their end-of-turn token; HH text keeps its space after
    ``Assistant:``. The trainer appends the tokenizer's EOS token after this.
    """
    reply = reply.strip()
    if uses_chat_template(tokenizer):
        return reply
    return " " + reply


def format_user_prompt(user_text: str, tokenizer) -> str:
    """A single user message in the model's prompt format (the Space's "Assistant reply" mode)."""
    return format_prompt([{"role": "user", "content": user_text}], tokenizer)


@dataclass(frozen=True)
class FittedConversation:
    messages: list[dict[str, str]]  # what the model sees: the system message, then the latest whole turns
    dropped_messages: int  # earlier messages left out to fit the budget


def fit_conversation(messages: list[dict[str, str]], tokenizer, budget: int) -> FittedConversation:
    """The conversation ``messages`` (system first if any, ending with a user message) cut to at most ``budget``
    prompt tokens by leaving out its oldest messages, whole, never the system message or the last user message.
    If those two alone are over the budget they are kept anyway (the caller trims tokens from the front)."""
    system = [m for m in messages if m["role"] == "system"]
    dialogue = [m for m in messages if m["role"] != "system"]
    if not dialogue or dialogue[-1]["role"] != "user":
        raise ValueError("a conversation must end with a user message")
    start = 0  # dialogue[start:] is kept; each cut drops the oldest message, then any reply left leading
    while start < len(dialogue) - 1:
        kept = system + dialogue[start:]
        if len(tokenizer(format_prompt(kept, tokenizer), add_special_tokens=False)["input_ids"]) <= budget:
            break
        start += 1
        while start < len(dialogue) - 1 and dialogue[start]["role"] != "user":
            start += 1  # a conversation the model sees starts with a user turn
    return FittedConversation(messages=system + dialogue[start:], dropped_messages=start)
