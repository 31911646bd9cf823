"""The model engine: one policy (and its reference) loaded once and shared by every request of the Space.

It builds prompts, streams generations through the scheduler (``scheduler.Scheduler``) on the CPU decoder
(``cpu``) or ``generate`` (``plain``), and scores replies with DPO's implicit reward. ``app.py`` only wires it
to Gradio. Errors meant for users are ``ValueError``s or ``GenerationError``s whose text says what to do.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

from dpo_space.cpu import DecoderBackend, build_decoders, compile_decoders
from dpo_space.inputs import MODE_REPLY, MODES, GenerationSettings, PreparedPrompt, check_text
from dpo_space.models import LoadedModel, load_model
from dpo_space.plain import GenerateBackend
from dpo_space.prompts import fit_conversation, format_prompt, format_response, format_user_prompt
from dpo_space.request import Phase, Request
from dpo_space.run_record import recorded_beta, recorded_reference
from dpo_space.scheduler import Scheduler
from dpo_space.scoring import completion_logps, reference_label, reference_model
from dpo_space.settings import EngineSettings

logger = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """The model failed while generating (raised in the consumer, with the cause chained)."""


def in_own_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a thread that ends with it. A thread that runs parallel torch code keeps an
    OpenMP team (its worker threads) for as long as it lives; with more of them than cores, libgomp stops
    spinning between parallel regions and every team slows down: decoding ran at ~0.5x beside one idle team on
    2 cores. So the engine computes on the scheduler's thread, or in threads that end, never in its caller's."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="engine") as pool:  # leaving it joins the thread
        return pool.submit(fn, *args, **kwargs).result()


class Engine:
    """One policy model (and its reference) loaded once and shared by all requests."""

    def __init__(
        self, policy: LoadedModel, reference: LoadedModel | None, beta: float, settings: EngineSettings | None = None
    ):
        settings = settings or EngineSettings()
        self.policy = policy
        self.reference = reference  # None: the reference is the policy with its adapter disabled, or itself
        self.beta = beta
        self.settings = settings
        self.max_input_tokens = settings.max_input_tokens
        self.max_batch = settings.max_batch
        self.stream_timeout = settings.stream_timeout
        self.stream_interval = settings.stream_interval
        self._lock = threading.Lock()  # one batch or scoring at a time: the adapter toggle is global to the model
        self._count_lock = threading.Lock()
        self._requests: set[Request] = set()
        self.decoders = in_own_thread(build_decoders, policy, reference, settings.decoder, settings.max_batch)
        self.compiled = threading.Event()  # set once the decoders decode with their compiled step
        self.compiling = None
        if settings.compile and self.decoders:
            if settings.compile_cache_dir:  # Inductor reads its cache folder from the environment when it compiles
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = settings.compile_cache_dir
            self.compiling = threading.Thread(target=self._compile_decoders, name="compile-decoders", daemon=True)
            self.compiling.start()

    # --- loading ---

    @classmethod
    def load(cls, model_id: str, ref_model_id: str | None = None, settings: EngineSettings | None = None) -> Engine:
        import torch

        settings = settings or EngineSettings()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = pick_dtype(settings.dtype, device)
        policy = in_own_thread(load_model, model_id, dtype=torch_dtype, device=device)
        ref_model_id = ref_model_id or recorded_reference(model_id)
        reference = in_own_thread(load_model, ref_model_id, dtype=torch_dtype, device=device) if ref_model_id else None
        logger.info("Loaded %s (%s, %s); reference: %s", model_id, torch_dtype, device, ref_model_id or "shared")
        return cls(policy, reference, beta=recorded_beta(model_id), settings=settings)

    def _compile_decoders(self) -> None:
        """In the background, while requests decode eagerly: each decoder switches to its compiled step when it
        is ready."""
        if compile_decoders(self.decoders):
            self.compiled.set()

    @property
    def decoder(self) -> str:
        return self.decoders[False].format if self.decoders else "generate"

    @property
    def tokenizer(self):
        return self.policy.tokenizer

    @property
    def reference_label(self) -> str:
        return reference_label(self.policy, self.reference)

    def info(self) -> dict:
        model = self.policy.model
        return {
            "model": self.policy.name,
            "base": self.policy.base,
            "adapter": self.policy.is_adapter,
            "reference": self.reference_label,
            "dtype": str(self.policy.dtype).removeprefix("torch."),
            "decoder": self.decoder,
            "compiled": self.compiled.is_set(),
            "device": str(self.policy.device),
            "parameters": sum(p.numel() for p in model.parameters()),
            "beta": self.beta,
            "max_input_tokens": self.max_input_tokens,
            "max_batch": self.max_batch,
            "active_generations": self.active_generations,
        }

    # --- prompts ---

    def prepare(self, text: str, mode: str, max_new_tokens: int) -> PreparedPrompt:
        check_text("prompt", text)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}; got {mode!r}")
        prompt = format_user_prompt(text, self.tokenizer) if mode == MODE_REPLY else text
        return self._fit(self.tokenizer(prompt, add_special_tokens=False)["input_ids"], max_new_tokens)

    def prepare_chat(self, messages: list[dict[str, str]], max_new_tokens: int) -> PreparedPrompt:
        """A conversation (a system message first if any, ending with the user's message) in the prompt format
        training used; when it is over the input budget, its oldest messages are left out, whole."""
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("a conversation must end with a user message")
        check_text("message", messages[-1]["content"])
        fitted = fit_conversation(messages, self.tokenizer, self._budget(max_new_tokens))
        ids = self.tokenizer(format_prompt(fitted.messages, self.tokenizer), add_special_tokens=False)["input_ids"]
        return replace(self._fit(ids, max_new_tokens), dropped_messages=fitted.dropped_messages)

    def _budget(self, max_new_tokens: int) -> int:
        context = getattr(self.policy.model.config, "max_position_embeddings", None) or 2048
        return max(1, min(self.max_input_tokens, context - max_new_tokens))

    def _fit(self, ids: list[int], max_new_tokens: int) -> PreparedPrompt:
        budget = self._budget(max_new_tokens)
        return PreparedPrompt(input_ids=ids[-budget:], dropped_tokens=max(0, len(ids) - budget))

    # --- generation ---

    def submit(self, prompt_ids: list[int], settings: GenerationSettings, use_reference: bool = False,
               stream: bool = True) -> Request:  # fmt: skip
        """Queue a generation; its text streams through ``request.streamer`` (``stream``), else read
        ``request.generated`` once ``request.wait_finished()``."""
        from transformers import TextIteratorStreamer

        streamer = None
        if stream:  # its timeout bounds each wait for text; the consumer tells a queued request from a stuck one
            streamer = TextIteratorStreamer(self.tokenizer, skip_special_tokens=True, timeout=self.stream_timeout)
        request = Request(prompt_ids, settings, use_reference, streamer=streamer)
        with self._count_lock:  # forget finished requests here too, so the set stays small without /info calls
            self._requests = {r for r in self._requests if not r.finished} | {request}
        self.scheduler.submit(request)
        return request

    def stream(
        self, prompt: PreparedPrompt, settings: GenerationSettings, use_reference: bool = False, on_submit=None
    ) -> Iterator[str]:
        """Yield the growing reply: the first text at once, then at most one update per ``stream_interval``
        seconds, the last with the whole reply. Concurrent streams are batched together. Closing the iterator
        (Stop, a closed tab) ends this stream at the next token and leaves the others running. ``on_submit``
        receives the ``Request`` (its token count, once finished)."""
        request = self.submit(prompt.input_ids, settings, use_reference)
        if on_submit is not None:
            on_submit(request)
        text = shown = ""
        last_update = 0.0
        try:
            for piece in self._pieces(request):
                text += piece
                if not request.streamer.text_queue.empty():
                    continue  # take all the text that has arrived first
                if text == shown or time.monotonic() - last_update < self.stream_interval:
                    continue  # each update costs the web server a message
                shown, last_update = text, time.monotonic()
                yield text
                # wake once per update, not once per token: the model's thread keeps the CPU meanwhile
                request.wait_finished(max(0.0, self.stream_interval - (time.monotonic() - last_update)))
            if request.error is not None:
                raise GenerationError(
                    f"the model failed while generating ({type(request.error).__name__}); try again"
                ) from request.error
            if text != shown:
                yield text
        finally:
            self.scheduler.withdraw(request)

    def stream_pair(self, prompt: PreparedPrompt, settings: GenerationSettings) -> Iterator[tuple[str, str]]:
        """Yield (the policy's reply, the reference's) as both grow, with the same settings and seed: two streams
        at once, which the CPU decoder decodes in one batch (``generate`` runs one batch after the other). Closing
        the iterator stops both; an error in either ends it."""
        updates: queue.Queue = queue.Queue()
        requests: list[Request] = []

        def pump(index: int) -> None:
            try:
                for text in self.stream(prompt, settings, use_reference=index == 1, on_submit=requests.append):
                    updates.put((index, text))
            except BaseException as error:  # raised in the consumer's thread
                updates.put((index, error))
            finally:
                updates.put((index, None))

        texts, running = ["", ""], 2
        try:
            for index in (0, 1):
                threading.Thread(target=pump, args=(index,), name=f"stream-pair-{index}", daemon=True).start()
            while running:
                index, update = updates.get()
                if update is None:
                    running -= 1
                elif isinstance(update, BaseException):
                    raise update
                else:
                    texts[index] = update
                    if updates.empty():  # take what has arrived from both first
                        yield texts[0], texts[1]
            yield texts[0], texts[1]
        finally:
            for request in list(requests):
                self.scheduler.withdraw(request)

    def _pieces(self, request: Request) -> Iterator[str]:
        """The request's text as its streamer gives it. Waiting for a batch is not an error (the queue in front
        bounds that wait); a running request that produces nothing for ``stream_timeout`` seconds is."""
        while True:
            queued = request.phase is Phase.WAITING  # a batch that starts during this wait gets a whole one
            try:
                piece = next(request.streamer)
            except StopIteration:
                return
            except queue.Empty:
                if queued:
                    continue
                raise GenerationError(f"the model produced nothing for {self.stream_timeout:g} s; try again") from None
            yield piece

    @property
    def active_generations(self) -> int:
        """Requests the model is still working on (a stopped one counts until the model has let it go)."""
        with self._count_lock:
            self._requests = {r for r in self._requests if not r.finished}
            return len(self._requests)

    @functools.cached_property
    def scheduler(self) -> Scheduler:
        """The queue in front of the model, with the CPU decoder's backend or ``generate``'s."""
        tokenizer = self.tokenizer
        eos = self.policy.model.generation_config.eos_token_id
        eos_ids = [tokenizer.eos_token_id] + [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
        eos_ids = list(dict.fromkeys(eos_ids))
        if self.decoders:
            backend = DecoderBackend(self.decoders.__getitem__, self._lock, eos_ids)
        else:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
            backend = GenerateBackend(self._reference_mode, self._lock, pad_id, eos_ids)
        return Scheduler(backend, self.max_batch)

    def _reference_mode(self, use_reference: bool):
        """A context giving the model to run: the policy, or its reference."""
        if not use_reference:
            if not self.decoders:  # generate decodes faster merged; scoring alone is one forward, not worth a merge
                self._merge_adapter()
            return contextlib.nullcontext(self.policy.model)
        return reference_model(self.policy, self.reference)

    @functools.cached_property
    def _mergeable_layers(self) -> list:
        """The LoRA layers of an fp32 adapter (none otherwise: bf16 merge/unmerge round trips drift the base)."""
        import torch

        if not self.policy.is_adapter or self.policy.dtype != torch.float32:
            return []
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.policy.model.modules() if isinstance(m, BaseTunerLayer)]

    def _merge_adapter(self) -> None:
        """Fold the adapter into its base weights for the policy: decoding skips two small matmuls per layer
        (17.7 vs 15.6 tokens/s on the 2-core CPU, bench.levers). The reference stays one copy: with the adapter
        disabled, PEFT unmerges on the next forward, and the next policy request merges again."""
        layers = self._mergeable_layers
        if layers and not all(m.merged for m in layers):
            self.policy.model.merge_adapter()

    # --- scoring ---

    def implicit_reward(self, prompt_ids: list[int], reply: str) -> float:
        """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)), the reply formatted and closed with EOS
        as in training."""
        reply_ids = self.tokenizer(
            format_response(reply, self.tokenizer) + self.tokenizer.eos_token, add_special_tokens=False
        )["input_ids"]
        logps = [in_own_thread(self._completion_logp, use_reference, prompt_ids, reply_ids) for use_reference in
                 (False, True)]  # fmt: skip
        return self.beta * (logps[0] - logps[1])

    def _completion_logp(self, use_reference: bool, prompt_ids: list[int], reply_ids: list[int]) -> float:
        with self._lock:  # between two decoding steps: one OpenMP team at a time (docs/architecture.md)
            if self.decoders:  # the weights the Space decodes with: 2.5x faster than the fp32 model on a CPU
                return self.decoders[use_reference].completion_logps([(prompt_ids, reply_ids)])[0]
            with self._reference_mode(use_reference) as model:
                return completion_logps(model, [(prompt_ids, reply_ids)])[0]


def pick_dtype(name: str, device: str):
    """``auto``: bf16 on CUDA; fp32 on CPU, where it decoded faster (21.5 vs 18.2 tokens/s, bench.levers)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"DTYPE must be auto, float32, bfloat16 or float16; got {name!r}") from None
