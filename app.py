"""DPO Space: chat with a DPO-aligned model, compare it with its reference, and let it judge replies.

    python app.py [--model MODEL_ID] [--port 7860]

Settings come from the environment, read once by ``dpo_space.settings.SpaceSettings``; docs/configuration.md lists
them all (MODEL_ID, default the shipped adapter models/smollm2-135m-dpo-hh-lora; DECODER; MAX_BATCH; FEEDBACK_DIR;
COMPILE_CACHE_DIR; ...). ``--model``, ``--ref-model`` and ``--port`` override theirs.
"""

import spaces  # noqa: I001  (must come before torch for ZeroGPU)

import dataclasses
import functools
import inspect
import logging
import os
import signal
from collections.abc import Iterator

import gradio as gr

from dpo_space import shipped
from dpo_space.api_errors import malformed_request
from dpo_space.arena import Arena
from dpo_space.cli import command_parser
from dpo_space.engine import Engine, GenerationError
from dpo_space.feedback import FeedbackStore, load_salt, start_hub_sync
from dpo_space.inputs import (
    MAX_PROMPT_CHARS,
    MODE_CONTINUE,
    MODE_REPLY,
    GenerationSettings,
    check_messages,
    check_text,
    message_text,
)
from dpo_space.memory import bound_kernel_caches, limit_malloc_arenas, trim_periodically
from dpo_space.openai_api import CompletionsAPI
from dpo_space.settings import SpaceSettings

EXAMPLES = [
    "I am an AI engineer",
    "How do I make a good cup of coffee?",
    "My neighbour's dog barks all night. What should I do?",
    "Write a short poem about the sea.",
]
DEFAULTS = GenerationSettings()
POLICY, REFERENCE = "DPO model", "Reference"  # whom the Chat tab talks to
ARENA_NOTICE = ("Votes are stored to train future versions of this model and may be published as a dataset: the "
                "prompt, both replies and your vote, with no IP address and your session only as a salted hash. "
                "Do not type anything private.")  # fmt: skip
engine: Engine | None = None
arena: Arena | None = None
logger = logging.getLogger(__name__)


def user_errors(fn):
    """Show ``ValueError``/``GenerationError`` as ``gr.Error``: users see the message, never a trace."""
    errors = (ValueError, GenerationError)

    @functools.wraps(fn)
    def stream(*args):
        try:
            yield from fn(*args)
        except errors as e:
            raise gr.Error(str(e)) from None

    @functools.wraps(fn)
    def call(*args):
        try:
            return fn(*args)
        except errors as e:
            raise gr.Error(str(e)) from None

    return stream if inspect.isgeneratorfunction(fn) else call


def sampling_endpoint(fn):
    """``fn(..., settings)`` as an endpoint that takes each sampling setting as a parameter of its own, named, typed
    and defaulted as ``GenerationSettings``' fields (the API's parameters after ``fn``'s own), checked into the
    ``settings`` it passes on. One definition of the settings for every endpoint and the API's docs."""
    own = [p for name, p in inspect.signature(fn).parameters.items() if name != "settings"]
    sampling = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=getattr(DEFAULTS, f.name),
            annotation=type(getattr(DEFAULTS, f.name)),
        )
        for f in dataclasses.fields(DEFAULTS)
    ]
    signature = inspect.Signature([*own, *sampling], return_annotation=inspect.signature(fn).return_annotation)

    def split(args, kwargs) -> tuple[dict, GenerationSettings]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = {p.name: bound.arguments[p.name] for p in sampling}
        return {p.name: bound.arguments[p.name] for p in own}, GenerationSettings.validated(**values)

    @functools.wraps(fn)
    def endpoint(*args, **kwargs):
        arguments, settings = split(args, kwargs)
        yield from fn(**arguments, settings=settings)

    endpoint.__signature__ = signature
    endpoint.__annotations__ = {**{p.name: p.annotation for p in signature.parameters.values()},
                                "return": signature.return_annotation}  # fmt: skip
    return endpoint


def prepare(prompt, mode, settings: GenerationSettings):
    """The prompt, formatted and fitted; a warning when it had to be cut."""
    prepared = engine.prepare(prompt, mode, settings.max_new_tokens)
    if prepared.dropped_tokens:
        kept = len(prepared.input_ids)
        gr.Warning(f"The prompt is {kept + prepared.dropped_tokens} tokens; kept the last {kept}.")
    return prepared


@spaces.GPU
@user_errors
@sampling_endpoint
def chat(
    message: str, history: list[dict], system_prompt: str = "", model: str = POLICY, *, settings: GenerationSettings
) -> Iterator[str]:
    """Stream the reply to `message` after `history` (earlier turns: [{"role": "user"|"assistant", "content": text}]).
    model: "DPO model" or "Reference"; an empty system_prompt is none; temperature 0 = greedy."""
    check_text("message", message)
    if model not in (POLICY, REFERENCE):
        raise ValueError(f"model must be {POLICY!r} or {REFERENCE!r}; got {model!r}")
    if not isinstance(system_prompt, str | None):
        raise ValueError(f"system_prompt must be text; got {type(system_prompt).__name__}")
    system = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    earlier = [m for m in check_messages(history) if m["role"] != "system"]
    conversation = [*system, *earlier, {"role": "user", "content": message}]
    prepared = engine.prepare_chat(conversation, settings.max_new_tokens)
    if prepared.dropped_messages:
        gr.Warning(
            f"The conversation is over the model's input of {engine.max_input_tokens} tokens: its "
            f"{prepared.dropped_messages} oldest messages were left out; the system prompt was kept."
        )
    yield from engine.stream(prepared, settings, use_reference=model == REFERENCE)


def add_user_message(message: str, history: list):
    """The Chat tab's first step: the typed message joins the conversation, and the box empties and stays locked
    until the reply has ended (a message sent meanwhile would race the reply's last update for the chat)."""
    if not isinstance(message, str) or not message.strip():
        raise gr.Error("message is empty: type something first")
    return gr.Textbox(value="", interactive=False), [*check_messages(history), {"role": "user", "content": message}]


def unlock_message_box():
    return gr.Textbox(interactive=True)


def respond(history: list, system_prompt: str, model: str, *values):
    """The Chat tab's second step: stream the reply to the conversation's last (user) message."""
    *earlier, last = check_messages(history)
    reply = {"role": "assistant", "content": ""}
    for text in chat(last["content"], earlier, system_prompt, model, *values):
        reply["content"] = text
        yield [*earlier, last, reply]


def without_last_reply(history: list) -> list:
    """Retry: the conversation up to its last user message, to answer again."""
    while history and history[-1]["role"] != "user":
        history = history[:-1]
    return history


def without_last_turn(history: list):
    """Undo: the last user message and its reply leave the conversation; the message goes back in the box."""
    history = without_last_reply(history)
    return (message_text(history[-1]["content"]), history[:-1]) if history else ("", [])


def feedback(history: list, model: str, like: gr.LikeData, request: gr.Request):
    """A thumbs up or down on a Chat reply: stored beside the Arena's votes, as unpaired feedback."""
    index = like.index[0] if isinstance(like.index, list | tuple) else like.index
    if not isinstance(index, int) or not 0 <= index < len(history) or history[index]["role"] != "assistant":
        return
    conversation = check_messages(history[:index])
    name = shipped.display_name(engine.policy.name) if model == POLICY else engine.reference_label
    arena.store.add_thumb(arena.store.session_hash(request.session_hash), name, arena.adapter_hash, conversation,
                          message_text(history[index]["content"]), bool(like.liked))  # fmt: skip


@spaces.GPU
@user_errors
@sampling_endpoint
def arena_round(prompt: str, request: gr.Request, *, settings: GenerationSettings) -> Iterator[tuple[str, str, str]]:
    """Start an Arena round: stream two anonymous replies to `prompt`, the DPO model's and its reference's in a
    random order (same settings and seed). Yields (round_id, reply A, reply B); vote with the round_id."""
    prepared = prepare(prompt, MODE_REPLY, settings)
    round_ = arena.start(request.session_hash, [{"role": "user", "content": prompt}], dataclasses.asdict(settings))
    yield round_.id, "", ""
    for policy_text, reference_text in engine.stream_pair(prepared, settings):
        round_.replies[round_.policy_side], round_.replies[round_.side_of(True)] = policy_text, reference_text
        yield round_.id, round_.replies["A"], round_.replies["B"]
    round_.finished = True
    yield round_.id, round_.replies["A"], round_.replies["B"]


@user_errors
def vote(round_id: str, choice: str, request: gr.Request) -> tuple[str, dict]:
    """Vote on an Arena round once both replies have finished: choice "A", "B", "tie" or "both_bad". Returns which
    model was which, and the scoreboard."""
    result = arena.vote(round_id, request.session_hash, choice)
    board = result["scoreboard"]
    rate = "-" if board["dpo_win_rate"] is None else f"{board['dpo_win_rate']:.2f}"
    low, high = board["ci95"]
    return (f"**A** was {result['A']}, **B** {result['B']}. DPO model over its reference: {board['dpo_wins']} wins, "
            f"{board['reference_wins']} losses (win rate {rate}, 95% interval {low:.2f}-{high:.2f}), "
            f"{board['ties']} ties, {board['both_bad']} both bad."), board  # fmt: skip


@spaces.GPU
@user_errors
@sampling_endpoint
def generate(prompt: str, mode: str = MODE_REPLY, *, settings: GenerationSettings) -> Iterator[str]:
    """Stream the model's reply to `prompt`. mode: "Assistant reply" or "Continue text"; temperature 0 = greedy."""
    yield from engine.stream(prepare(prompt, mode, settings), settings)


@spaces.GPU
@user_errors
@sampling_endpoint
def compare(prompt: str, *, settings: GenerationSettings) -> Iterator[tuple]:
    """Stream the DPO model's and the reference's replies (same settings and seed), then their implicit rewards."""
    prepared = prepare(prompt, MODE_REPLY, settings)
    policy_text = reference_text = ""
    for policy_text, reference_text in engine.stream_pair(prepared, settings):
        yield policy_text, reference_text, None, None
    rewards = [
        engine.implicit_reward(prepared.input_ids, t) if t.strip() else 0.0 for t in (policy_text, reference_text)
    ]
    yield policy_text, reference_text, *rewards


@spaces.GPU
@user_errors
def judge(prompt, response_a, response_b):
    """Which reply the DPO model prefers: the implicit reward of each and their margin."""
    check_text("response A", response_a)
    check_text("response B", response_b)
    ids = engine.prepare(prompt, MODE_REPLY, max_new_tokens=0).input_ids
    reward_a, reward_b = (engine.implicit_reward(ids, r) for r in (response_a, response_b))
    winner = "A" if reward_a >= reward_b else "B"
    return f"The DPO model prefers {winner} by a margin of {abs(reward_a - reward_b):.4f}.", reward_a, reward_b


def info() -> dict:
    """What is loaded, the model's shipped held-out metrics, and the Arena's scoreboard."""
    name = shipped.display_name(engine.policy.name)  # never this machine's path
    return {**engine.info(), "model": name, "metrics": shipped.held_out_metrics(engine.policy.name),
            "arena": arena.store.scoreboard()}  # fmt: skip


CONTROLS = {  # label and slider step of each sampling setting; the ranges are GenerationSettings.RANGES
    "max_new_tokens": ("Max new tokens", 1),
    "temperature": ("Temperature (0 = greedy)", 0.05),
    "top_p": ("Top-p", 0.01),
    "top_k": ("Top-k (0 = off)", 1),
    "repetition_penalty": ("Repetition penalty", 0.05),
    "no_repeat_ngram_size": ("No-repeat n-gram size (0 = off)", 1),
    "seed": ("Seed", None),
}


def settings_controls() -> list:
    controls = []
    for name, (label, step) in CONTROLS.items():
        limits, value = GenerationSettings.RANGES[name], getattr(DEFAULTS, name)
        precision = 0 if limits.integer else None
        if step is None:  # the seed: a number box, its range too wide for a slider
            controls.append(gr.Number(value, precision=0, minimum=limits.low, maximum=limits.high, label=label))
        else:
            controls.append(gr.Slider(limits.low, limits.high, value, step=step, precision=precision, label=label))
    return controls


def build_ui() -> gr.Blocks:
    with gr.Blocks(title="DPO Space") as demo:
        name = shipped.display_name(engine.policy.name)
        gr.Markdown(f"# DPO Space\nModel: `{name}` · reference: `{engine.reference_label}`")
        with gr.Tab("Chat"):
            chatbot = gr.Chatbot(label=name, height=440, buttons=["copy"])
            with gr.Row():
                message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=5,
                                     max_length=MAX_PROMPT_CHARS)  # fmt: skip
                send, chat_stop = gr.Button("Send", variant="primary", scale=1), gr.Button("Stop", scale=1)
            with gr.Row():
                talk_to = gr.Radio([POLICY, REFERENCE], value=POLICY, label="Talk to")
                chat_clear = gr.Button("Clear conversation")
            system_prompt = gr.Textbox(label="System prompt (optional)", lines=2, max_length=MAX_PROMPT_CHARS)
            with gr.Accordion("Sampling", open=False):
                chat_settings = settings_controls()
            gr.Examples(EXAMPLES, inputs=message)
            reply_inputs = [chatbot, system_prompt, talk_to, *chat_settings]
            private = {"api_visibility": "private"}
            asked = gr.on([send.click, message.submit], add_user_message, [message, chatbot], [message, chatbot],
                          **private)  # fmt: skip
            answering = asked.success(respond, reply_inputs, chatbot, concurrency_id="model", **private)
            answering.then(unlock_message_box, None, message, **private)  # after the reply's last update, or its error
            retried = chatbot.retry(without_last_reply, chatbot, chatbot, **private)
            retrying = retried.then(respond, reply_inputs, chatbot, concurrency_id="model", **private)
            chatbot.undo(without_last_turn, chatbot, [message, chatbot], **private)
            chatbot.like(feedback, [chatbot, talk_to], None, **private)
            chat_stop.click(unlock_message_box, None, message, cancels=[answering, retrying], **private)
            chat_clear.click(lambda: (gr.Textbox(value="", interactive=True), []), None, [message, chatbot],
                             cancels=[answering, retrying], **private)  # fmt: skip
            gr.api(chat, api_name="chat")
        with gr.Tab("Arena"):
            gr.Markdown(f"Two anonymous replies, the DPO model's and its reference's in a random order. Which is "
                        f"better? The names show after your vote.\n\n_{ARENA_NOTICE}_")  # fmt: skip
            with gr.Row():
                a_prompt = gr.Textbox(label="Prompt", lines=2, scale=5, max_length=MAX_PROMPT_CHARS)
                a_go = gr.Button("Start a round", variant="primary", scale=1)
            with gr.Row():
                a_reply, b_reply = (gr.Textbox(label=f"Reply {side}", lines=10, interactive=False) for side in "AB")
            with gr.Row():
                vote_buttons = {choice: gr.Button(label) for choice, label in
                                (("A", "A is better"), ("B", "B is better"), ("tie", "Tie"),
                                 ("both_bad", "Both are bad"))}  # fmt: skip
            round_id = gr.Textbox(visible=False)
            revealed = gr.Markdown()
            scoreboard = gr.JSON(label="Scoreboard", value=arena.store.scoreboard)
            with gr.Accordion("Sampling", open=False):
                a_settings = settings_controls()
            gr.Examples(EXAMPLES, inputs=a_prompt)
            gr.on([a_go.click, a_prompt.submit], arena_round, [a_prompt, *a_settings], [round_id, a_reply, b_reply],
                  api_name="arena", preprocess=False, concurrency_id="model")  # fmt: skip
            gr.api(vote, api_name="vote")  # before the buttons' events, which take other (private) names
            for choice, button in vote_buttons.items():
                button.click(vote, [round_id, gr.State(choice)], [revealed, scoreboard], **private)
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=4, max_length=MAX_PROMPT_CHARS)
                    mode = gr.Radio([MODE_REPLY, MODE_CONTINUE], value=MODE_REPLY, label="Mode")
                    with gr.Row():
                        go, stop, clear = (
                            gr.Button("Generate", variant="primary"),
                            gr.Button("Stop"),
                            gr.Button("Clear"),
                        )
                    with gr.Accordion("Sampling", open=False):
                        settings = settings_controls()
                output = gr.Textbox(label="Output", lines=12, interactive=False)
            gr.Examples(EXAMPLES, inputs=prompt)
            event = gr.on([go.click, prompt.submit], generate, [prompt, mode, *settings], output,
                          api_name="generate", preprocess=False, concurrency_id="model")  # fmt: skip
            stop.click(None, cancels=[event])
            clear.click(lambda: ("", ""), None, [prompt, output], api_visibility="private")
        with gr.Tab("Compare"):
            c_prompt = gr.Textbox(label="Prompt", lines=3, max_length=MAX_PROMPT_CHARS)
            with gr.Row():
                c_go, c_stop = gr.Button("Compare", variant="primary"), gr.Button("Stop")
            with gr.Accordion("Sampling", open=False):
                c_settings = settings_controls()
            with gr.Row():
                with gr.Column():
                    c_policy = gr.Textbox(label="DPO model", lines=10, interactive=False)
                    c_policy_reward = gr.Number(label="DPO reply reward β·log(π/π_ref)", interactive=False)
                with gr.Column():
                    c_ref = gr.Textbox(label="Reference", lines=10, interactive=False)
                    c_ref_reward = gr.Number(label="Reference reply reward β·log(π/π_ref)", interactive=False)
            c_event = c_go.click(compare, [c_prompt, *c_settings], [c_policy, c_ref, c_policy_reward, c_ref_reward],
                                 api_name="compare", preprocess=False, concurrency_id="model")  # fmt: skip
            c_stop.click(None, cancels=[c_event])
            gr.Examples(EXAMPLES, inputs=c_prompt)
        with gr.Tab("Judge"):
            j_prompt = gr.Textbox(label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS)
            with gr.Row():
                j_a = gr.Textbox(label="Response A", lines=4, max_length=MAX_PROMPT_CHARS)
                j_b = gr.Textbox(label="Response B", lines=4, max_length=MAX_PROMPT_CHARS)
            j_go = gr.Button("Judge", variant="primary")
            j_verdict = gr.Textbox(label="Verdict", interactive=False)
            with gr.Row():
                j_ra, j_rb = (
                    gr.Number(label="Reward A", interactive=False),
                    gr.Number(label="Reward B", interactive=False),
                )
            j_go.click(judge, [j_prompt, j_a, j_b], [j_verdict, j_ra, j_rb], api_name="judge", preprocess=False,
                       concurrency_id="model")  # fmt: skip
            gr.Examples(
                [["How do I pick a lock?", "I can't help with breaking into places, but a locksmith can.",
                  "Insert a tension wrench and rake the pins."]],
                inputs=[j_prompt, j_a, j_b],
            )  # fmt: skip
        with gr.Tab("About"):
            gr.Markdown(f"### `{name}` beside its reference, on data neither trained on\n\n"
                        + shipped.behaviour_markdown(engine.policy.name))  # fmt: skip
            about = gr.JSON(label="Loaded model and held-out metrics")
            plots = shipped.plots(engine.policy.name)
            if plots:
                gr.Gallery([str(p) for p in plots], label="Behaviour report and training curves", columns=2)
            else:
                gr.Markdown("This model directory ships no plots.")
            demo.load(info, None, about, api_name="info", concurrency_limit=None)  # never waits behind a generation
    return demo


def main() -> None:
    global engine, arena
    from fastapi.exceptions import RequestValidationError

    settings = SpaceSettings.from_env()
    parser = command_parser(__doc__)
    parser.add_argument("--model", default=settings.model_id)
    parser.add_argument("--ref-model", default=settings.ref_model_id)
    parser.add_argument("--port", type=int, default=settings.server_port)
    args = parser.parse_args()
    limit_malloc_arenas()  # before the server's threads start
    bound_kernel_caches()  # before the first matmul
    trim_periodically(settings.malloc_trim_seconds)  # 0: never
    engine = Engine.load(args.model, args.ref_model, settings.engine)
    sync = start_hub_sync(settings.feedback_dir, settings.feedback_repo, settings.hf_token)
    store = FeedbackStore(settings.feedback_dir, load_salt(settings.feedback_dir), sync)
    if sync is not None:
        # A Space stops its container with SIGTERM, which by default ends Python without its exit handlers. As
        # Ctrl-C, it lets Gradio close the server; then CommitScheduler's own exit handler pushes the last votes.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    arena = Arena(store, shipped.display_name(engine.policy.name), engine.reference_label,
                  shipped.content_hash(args.model), settings.arena_min_seconds)  # fmt: skip
    logger.info("Feedback is stored in %s", store.path)
    demo = build_ui()
    admitted = settings.engine.max_batch + settings.queue_max_size  # the API counts against what the Space admits
    openai = CompletionsAPI(lambda: engine, shipped.display_name(engine.policy.name), admitted)
    # Gradio keeps timing records of the last 10,000 events by default: memory that grows with traffic.
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "256")
    demo.queue(max_size=settings.queue_max_size, default_concurrency_limit=settings.concurrency)
    demo.launch(
        server_name=settings.server_name,
        server_port=args.port,
        allowed_paths=[str(p) for p in shipped.plots(args.model)],  # the plots, not the weights beside them
        show_error=True,
        state_session_capacity=settings.state_session_capacity,
        theme=gr.themes.Soft(),
        app_kwargs={
            "exception_handlers": {RequestValidationError: malformed_request},
            "routes": openai.routes(),  # /v1/chat/completions and /v1/models, before Gradio's own routes
        },
    )


if __name__ == "__main__":
    main()
