"""OpenAI-compatible chat completions on the Space's own server: ``POST /v1/chat/completions`` (streamed as
server-sent events, or not) and ``GET /v1/models``.

They share the Space's engine, so API calls and UI users decode in the same batches, and they count against the
same limit: when the engine already holds as many requests as the Space admits (``MAX_BATCH`` running plus
``QUEUE_MAX_SIZE`` waiting), a call is told the Space is busy (503). A request the API cannot serve gets
OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, with status 400.

    curl http://127.0.0.1:7860/v1/chat/completions -H 'content-type: application/json' \\
      -d '{"model": "smollm2-135m-dpo-hh-lora", "messages": [{"role": "user", "content": "Hi!"}]}'
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, fields

from starlette.requests import Request

from dpo_space.engine import GenerationError
from dpo_space.inputs import GenerationSettings, check_messages

REFERENCE = "reference"  # the model id that chooses the DPO model's reference
MAX_STOPS = 4


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    settings: GenerationSettings
    use_reference: bool
    stream: bool
    stops: tuple[str, ...]


# OpenAI's parameter -> the Space's setting; the rest of the settings keep the Space's defaults
PARAMETERS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
              "top_p": "top_p", "seed": "seed"}  # fmt: skip


def parse_chat_request(body, policy_id: str) -> ChatRequest:
    """Check an OpenAI chat-completions body; an ``APIError`` says what is wrong and names the parameter."""
    if not isinstance(body, dict):
        raise APIError("the body must be a JSON object with 'messages'")
    model = body.get("model") or policy_id
    if model not in (policy_id, REFERENCE):
        raise APIError(f"model must be {policy_id!r} (the DPO model) or {REFERENCE!r}; got {model!r}", "model")
    if body.get("n", 1) != 1:
        raise APIError(f"n must be 1; got {body.get('n')!r}", "n")
    messages = body.get("messages")
    if isinstance(messages, list):  # OpenAI's newer name for the system role
        messages = [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
                    for m in messages]  # fmt: skip
    try:
        messages = check_messages(messages)
    except ValueError as e:
        raise APIError(str(e), "messages") from None
    if not messages or messages[-1]["role"] != "user":
        raise APIError("messages must end with a user message", "messages")
    values = {f.name: getattr(GenerationSettings(), f.name) for f in fields(GenerationSettings)}
    for name, setting in PARAMETERS.items():
        if body.get(name) is not None:
            values[setting] = body[name]
    try:
        settings = GenerationSettings.validated(**values)
    except ValueError as e:
        wrong = next((n for n, s in PARAMETERS.items() if str(e).startswith(s) and n in body), None)
        raise APIError(str(e), wrong) from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(f"stream must be true or false; got {stream!r}", "stream")
    return ChatRequest(model, messages, settings, model == REFERENCE, stream, parse_stops(body.get("stop")))


def parse_stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else None
    if stops is None or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop")
    return stops


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first stop sequence, and whether one was found."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def completion_pieces(engine, chat: ChatRequest) -> Iterator[tuple[str, str | None, dict]]:
    """The reply as ``(new text, finish_reason or None, usage)`` pieces, stop sequences applied: the last piece has
    the finish reason. Text that could still turn into a stop sequence is held back until it cannot."""
    prepared = engine.prepare_chat(chat.messages, chat.settings.max_new_tokens)
    submitted = []
    stream = engine.stream(prepared, chat.settings, chat.use_reference, on_submit=submitted.append)
    hold = max((len(s) - 1 for s in chat.stops), default=0)
    sent, stopped = 0, False
    try:
        for text in stream:
            text, stopped = cut_at_stop(text, chat.stops)
            safe = len(text) if stopped else max(sent, len(text) - hold)
            if safe > sent:
                yield text[sent:safe], None, {}
                sent = safe
            if stopped:
                break
    finally:
        stream.close()  # a stop sequence, or a client gone: the model lets the request go at its next step
    request = submitted[0]
    request.wait_finished(engine.stream_timeout)
    final, _ = cut_at_stop(engine.tokenizer.decode(request.generated, skip_special_tokens=True), chat.stops)
    tokens = len(request.generated)
    reason = "length" if not stopped and tokens >= chat.settings.max_new_tokens else "stop"
    usage = {"prompt_tokens": len(prepared.input_ids), "completion_tokens": tokens,
             "total_tokens": len(prepared.input_ids) + tokens}  # fmt: skip
    yield ("" if stopped else final[sent:]), reason, usage


class CompletionsAPI:
    """The endpoints, over ``engine_of()`` (the loaded engine) with at most ``limit`` requests in the engine."""

    def __init__(self, engine_of, policy_id: str, limit: int):
        self.engine_of, self.policy_id, self.limit = engine_of, policy_id, limit

    def routes(self) -> list:
        from fastapi.routing import APIRoute

        return [APIRoute("/v1/models", self.models, methods=["GET"]),
                APIRoute("/v1/chat/completions", self.completions, methods=["POST"])]  # fmt: skip

    def models(self):
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "dpo-space"}
                                           for name in (self.policy_id, REFERENCE)]}  # fmt: skip

    async def completions(self, request: Request):
        from fastapi.responses import JSONResponse, StreamingResponse
        from starlette.concurrency import run_in_threadpool

        try:
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError):
                raise APIError("the body is not valid JSON") from None
            chat = parse_chat_request(body, self.policy_id)
            engine = self.engine_of()
            if engine.active_generations >= self.limit:
                raise APIError(f"the Space is busy ({engine.active_generations} requests running or waiting); try "
                               f"again in a few seconds", status=503, code="busy")  # fmt: skip
            pieces = completion_pieces(engine, chat)
            if chat.stream:
                first = await run_in_threadpool(next, pieces)  # a bad prompt fails here, as a 400
                return StreamingResponse(self._events(chat, first, pieces), media_type="text/event-stream")
            return JSONResponse(await run_in_threadpool(self._whole, chat, pieces))
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except ValueError as e:  # the engine's checks (an empty message, a bad history)
            return JSONResponse(APIError(str(e), "messages").body(), status_code=400)
        except GenerationError as e:
            return JSONResponse(APIError(str(e), status=500).body(), status_code=500)

    def _whole(self, chat: ChatRequest, pieces) -> dict:
        pieces = list(pieces)
        text = "".join(piece for piece, _, _ in pieces)
        _, reason, usage = pieces[-1]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        return {**self._head(chat, "chat.completion"), "usage": usage, "choices": [choice]}

    def _events(self, chat: ChatRequest, first, pieces) -> Iterator[str]:
        head = self._head(chat, "chat.completion.chunk")

        def event(delta: dict, reason=None) -> str:
            chunk = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            return f"data: {json.dumps(chunk)}\n\n"

        yield event({"role": "assistant", "content": ""})
        try:
            for piece, reason, _ in itertools.chain([first], pieces):
                if piece:
                    yield event({"content": piece})
                if reason:
                    yield event({}, reason)
        except GenerationError as e:  # the status line has gone: the error is the stream's last event
            yield f"data: {json.dumps(APIError(str(e), status=500).body())}\n\n"
        yield "data: [DONE]\n\n"

    def _head(self, chat: ChatRequest, kind: str) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": chat.model}
