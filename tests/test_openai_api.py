"""The OpenAI-compatible API's request checks and stop sequences, on literal bodies (the live endpoints:
tests/test_chat.py)."""

import pytest

from dpo_space.inputs import GenerationSettings
from dpo_space.openai_api import REFERENCE, APIError, cut_at_stop, parse_chat_request

MODEL = "smollm2-135m-dpo-hh-lora"
HI = [{"role": "user", "content": "Hi"}]


def test_a_minimal_body_takes_the_spaces_defaults():
    chat = parse_chat_request({"messages": HI}, MODEL)
    assert (chat.model, chat.use_reference, chat.stream, chat.stops) == (MODEL, False, False, ())
    assert chat.settings == GenerationSettings() and chat.messages == HI


def test_openai_parameters_map_to_the_spaces_settings():
    body = {"model": REFERENCE, "messages": [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 5, "temperature": 0,
            "top_p": 0.5, "seed": 3, "stop": "\n", "stream": True}  # fmt: skip
    chat = parse_chat_request(body, MODEL)
    assert chat.use_reference and chat.stream and chat.stops == ("\n",)
    assert chat.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (chat.settings.max_new_tokens, chat.settings.temperature, chat.settings.top_p, chat.settings.seed) == (
        5, 0.0, 0.5, 3)  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ([], None, "the body must be a JSON object with 'messages'"),
        ({"messages": HI, "model": "gpt-4"}, "model", f"model must be {MODEL!r} (the DPO model) or 'reference'"),
        ({"messages": HI, "n": 2}, "n", "n must be 1; got 2"),
        ({"messages": "Hi"}, "messages", "history must be a list of messages (role, content); got str"),
        ({"messages": []}, "messages", "messages must end with a user message"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "message 0 must have a role"),
        ({"messages": HI, "max_tokens": 5000}, "max_tokens", "max_new_tokens must be in [1, 1024]; got 5000"),
        ({"messages": HI, "temperature": float("nan")}, "temperature", "temperature must be in [0, 2]; got nan"),
        ({"messages": HI, "stop": ["a", ""]}, "stop", "stop must be a string or a list of at most 4 non-empty"),
        ({"messages": HI, "stop": 1}, "stop", "stop must be a string or a list of at most 4 non-empty"),
        ({"messages": HI, "stream": "yes"}, "stream", "stream must be true or false; got 'yes'"),
    ],
)
def test_a_bad_request_names_the_parameter_and_says_what_is_allowed(body, param, message):
    with pytest.raises(APIError) as error:
        parse_chat_request(body, MODEL)
    assert error.value.param == param and str(error.value).startswith(message) and error.value.status == 400
    assert error.value.body()["error"]["type"] == "invalid_request_error"


def test_the_reply_ends_before_the_first_stop_sequence():
    assert cut_at_stop("Hello.\nHuman: more", ("\nHuman:", "Human")) == ("Hello.", True)
    assert cut_at_stop("Hello.", ("\nHuman:",)) == ("Hello.", False)
