"""What a request may ask for: the sampling settings and their ranges, the prompt modes, the text limits.

Every check raises a ``ValueError`` whose text says what is wrong and what is allowed; the app shows it to users
with ``gr.Error``, the API as an error message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

MODE_REPLY = "Assistant reply"
MODE_CONTINUE = "Continue text"
MODES = (MODE_REPLY, MODE_CONTINUE)
MAX_PROMPT_CHARS = 100_000  # a cap on every text field; longer input is refused before tokenizing


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    integer: bool = False

    def check(self, name: str, value):
        integral = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
        if isinstance(value, bool) or not isinstance(value, int | float) or (self.integer and not integral):
            kind = "an integer" if self.integer else "a number"
            raise ValueError(f"{name} must be {kind} in [{self.low:g}, {self.high:g}]; got {value!r}")
        if math.isnan(value) or not self.low <= value <= self.high:
            raise ValueError(f"{name} must be in [{self.low:g}, {self.high:g}]; got {value!r}")
        return int(value) if self.integer else float(value)


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling controls, as the UI's sliders and the API's parameters."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.2
    no_repeat_ngram_size: int = 0
    seed: int = 42

    RANGES = {
        "max_new_tokens": Range(1, 1024, integer=True),
        "temperature": Range(0.0, 2.0),
        "top_p": Range(0.01, 1.0),
        "top_k": Range(0, 200, integer=True),
        "repetition_penalty": Range(1.0, 2.0),
        "no_repeat_ngram_size": Range(0, 10, integer=True),
        "seed": Range(0, 2**31 - 1, integer=True),
    }

    @classmethod
    def validated(cls, **values) -> GenerationSettings:
        """Check each value against its range; a ``ValueError`` names the parameter and the range."""
        return cls(**{f.name: cls.RANGES[f.name].check(f.name, values[f.name]) for f in fields(cls)})

    def generate_kwargs(self) -> dict:
        sampling = self.temperature > 0
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": sampling,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if sampling:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # greedy: unset the model's own sampling defaults so generate does not warn
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class PreparedPrompt:
    input_ids: list[int]
    dropped_tokens: int  # tokens cut from the front to fit the input budget
    dropped_messages: int = 0  # a conversation's oldest messages left out to fit it


ROLES = ("system", "user", "assistant")


def message_text(content) -> str:
    """A chat message's text: a string, or Gradio's list of parts (``{"type": "text", "text": ...}``)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict) and isinstance(content.get("text"), str):
        return content["text"]
    if isinstance(content, list | tuple) and all(isinstance(part, str | dict) for part in content):
        return "".join(message_text(part) for part in content)
    raise ValueError(f"a message's content must be text; got {type(content).__name__}")


def check_messages(messages) -> list[dict[str, str]]:
    """A conversation as ``[{"role": ..., "content": ...}]`` with text contents, each checked like a prompt."""
    if not isinstance(messages, list | tuple):
        raise ValueError(f"history must be a list of messages (role, content); got {type(messages).__name__}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            raise ValueError(f"message {i} must have a role ({', '.join(ROLES)}) and a content; got {message!r:.80}")
        text = message_text(message["content"])
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"message {i} is {len(text):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
        checked.append({"role": message["role"], "content": text})
    return checked


def check_text(name: str, text) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text; got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{name} is empty: type something first")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is {len(text):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    return text
