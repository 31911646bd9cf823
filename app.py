"""DPO Space: generate with a DPO-aligned model, compare it with its reference, and let it judge replies.

    python app.py [--model MODEL_ID] [--port 7860]

Environment: MODEL_ID (a Hub id, a local checkpoint, a local PEFT adapter, or ``embedded``; default: the shipped
adapter models/smollm2-135m-dpo-hh-lora), REF_MODEL_ID,
DTYPE (auto|float32|bfloat16), DECODER (auto|int4|fp32|generate), DECODER_COMPILE (default 1: compile the
decoder's step in the background, serving eagerly meanwhile; 0: never),
QUEUE_MAX_SIZE, MAX_BATCH, CONCURRENCY, MAX_INPUT_TOKENS, STREAM_INTERVAL, STREAM_TIMEOUT, STATE_SESSION_CAPACITY,
GRADIO_SERVER_NAME (default 127.0.0.1), GRADIO_SERVER_PORT.
"""

import spaces  # noqa: I001  (must come before torch for ZeroGPU)

import argparse
import functools
import inspect
import logging
import os
from pathlib import Path

import gradio as gr

from dpo_space import serving, shipped
from dpo_space.serving import MODE_CONTINUE, MODE_REPLY, Engine, GenerationSettings

# The project's own DPO model (a LoRA adapter on the embedded SmolLM2-135M-Instruct), shipped in the repo.
DEFAULT_MODEL_ID = str(Path(__file__).resolve().parent / "models" / "smollm2-135m-dpo-hh-lora")
EXAMPLES = [
    "I am an AI engineer",
    "How do I make a good cup of coffee?",
    "My neighbour's dog barks all night. What should I do?",
    "Write a short poem about the sea.",
]
DEFAULTS = GenerationSettings()
engine: Engine | None = None


def user_errors(fn):
    """Show ``ValueError``/``GenerationError`` as ``gr.Error``: users see the message, never a trace."""
    errors = (ValueError, serving.GenerationError)

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


def prepare(prompt, mode, values: dict):
    """Validate the settings found in ``values`` (an endpoint's arguments) and build the prompt."""
    settings = GenerationSettings.validated(**{name: values[name] for name in GenerationSettings.RANGES})
    prepared = engine.prepare(prompt, mode, settings.max_new_tokens)
    if prepared.dropped_tokens:
        kept = len(prepared.input_ids)
        gr.Warning(f"The prompt is {kept + prepared.dropped_tokens} tokens; kept the last {kept}.")
    return prepared, settings


@spaces.GPU
@user_errors
def generate(
    prompt: str,
    mode: str = MODE_REPLY,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    temperature: float = DEFAULTS.temperature,
    top_p: float = DEFAULTS.top_p,
    top_k: int = DEFAULTS.top_k,
    repetition_penalty: float = DEFAULTS.repetition_penalty,
    no_repeat_ngram_size: int = DEFAULTS.no_repeat_ngram_size,
    seed: int = DEFAULTS.seed,
):
    """Stream the model's reply to `prompt`. mode: "Assistant reply" or "Continue text"; temperature 0 = greedy."""
    prepared, settings = prepare(prompt, mode, locals())
    yield from engine.stream(prepared, settings)


@spaces.GPU
@user_errors
def compare(
    prompt: str,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    temperature: float = DEFAULTS.temperature,
    top_p: float = DEFAULTS.top_p,
    top_k: int = DEFAULTS.top_k,
    repetition_penalty: float = DEFAULTS.repetition_penalty,
    no_repeat_ngram_size: int = DEFAULTS.no_repeat_ngram_size,
    seed: int = DEFAULTS.seed,
):
    """Stream the DPO model's and the reference's replies (same settings and seed), then their implicit rewards."""
    prepared, settings = prepare(prompt, MODE_REPLY, locals())
    policy_text = reference_text = ""
    for policy_text in engine.stream(prepared, settings):
        yield policy_text, "", None, None
    for reference_text in engine.stream(prepared, settings, use_reference=True):
        yield policy_text, reference_text, None, None
    rewards = [
        engine.implicit_reward(prepared.input_ids, t) if t.strip() else 0.0 for t in (policy_text, reference_text)
    ]
    yield policy_text, reference_text, *rewards


@spaces.GPU
@user_errors
def judge(prompt, response_a, response_b):
    """Which reply the DPO model prefers: the implicit reward of each and their margin."""
    serving.check_text("response A", response_a)
    serving.check_text("response B", response_b)
    ids = engine.prepare(prompt, MODE_REPLY, max_new_tokens=0).input_ids
    reward_a, reward_b = (engine.implicit_reward(ids, r) for r in (response_a, response_b))
    winner = "A" if reward_a >= reward_b else "B"
    return f"The DPO model prefers {winner} by a margin of {abs(reward_a - reward_b):.4f}.", reward_a, reward_b


def info() -> dict:
    """What is loaded, and the model's shipped held-out metrics."""
    name = shipped.display_name(engine.policy.name)  # never this machine's path
    return {**engine.info(), "model": name, "metrics": shipped.held_out_metrics(engine.policy.name)}


def settings_controls():
    d = DEFAULTS
    return [
        gr.Slider(1, 1024, d.max_new_tokens, step=1, precision=0, label="Max new tokens"),
        gr.Slider(0.0, 2.0, d.temperature, step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0.01, 1.0, d.top_p, step=0.01, label="Top-p"),
        gr.Slider(0, 200, d.top_k, step=1, precision=0, label="Top-k (0 = off)"),
        gr.Slider(1.0, 2.0, d.repetition_penalty, step=0.05, label="Repetition penalty"),
        gr.Slider(0, 10, d.no_repeat_ngram_size, step=1, precision=0, label="No-repeat n-gram size (0 = off)"),
        gr.Number(d.seed, precision=0, minimum=0, label="Seed"),
    ]


def build_ui() -> gr.Blocks:
    with gr.Blocks(title="DPO Space") as demo:
        name = shipped.display_name(engine.policy.name)
        gr.Markdown(f"# DPO Space\nModel: `{name}` · reference: `{engine.reference_label}`")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=4, max_length=serving.MAX_PROMPT_CHARS)
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
            c_prompt = gr.Textbox(label="Prompt", lines=3, max_length=serving.MAX_PROMPT_CHARS)
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
            j_prompt = gr.Textbox(label="Prompt", lines=2, max_length=serving.MAX_PROMPT_CHARS)
            with gr.Row():
                j_a = gr.Textbox(label="Response A", lines=4, max_length=serving.MAX_PROMPT_CHARS)
                j_b = gr.Textbox(label="Response B", lines=4, max_length=serving.MAX_PROMPT_CHARS)
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
    global engine
    from fastapi.exceptions import RequestValidationError

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL_ID", DEFAULT_MODEL_ID))
    parser.add_argument("--ref-model", default=os.environ.get("REF_MODEL_ID"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = parser.parse_args()
    env = os.environ.get
    engine = Engine.load(args.model, args.ref_model, dtype=env("DTYPE", "auto"), decoder=env("DECODER", "auto"),
                         compile=env("DECODER_COMPILE", "1") == "1")  # fmt: skip
    demo = build_ui()
    # Gradio keeps timing records of the last 10,000 events by default: memory that grows with traffic.
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "256")
    demo.queue(
        max_size=int(os.environ.get("QUEUE_MAX_SIZE", "16")),
        # as many requests at once as the engine batches together (MAX_BATCH); more wait in the queue
        default_concurrency_limit=int(os.environ.get("CONCURRENCY", engine.max_batch)),
    )
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=args.port,
        allowed_paths=[str(p) for p in shipped.plots(args.model)],  # the plots, not the weights beside them
        show_error=True,
        # Gradio keeps per-session data for this many sessions (default 10,000); our endpoints are stateless,
        # so a small cap keeps the server's memory flat under many short-lived clients.
        state_session_capacity=int(os.environ.get("STATE_SESSION_CAPACITY", "64")),
        theme=gr.themes.Soft(),
        app_kwargs={"exception_handlers": {RequestValidationError: serving.malformed_request}},
    )


if __name__ == "__main__":
    main()
