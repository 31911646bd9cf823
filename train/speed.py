"""Training speed levers that TRL does not expose as options, as a ``DPOTrainer`` subclass (``FastDPOTrainer``).

Both change how a batch is computed, never what: the log-probabilities and gradients are the same
(``tests/test_train.py`` checks both). Both are switched on only while the trainer's own forward passes run and
undone after, so nothing outside the trainer sees a changed model or library.
"""

from __future__ import annotations

import contextlib


def pack_pairs(input_ids, attention_mask):
    """A batch in TRL's DPO layout (rows: every pair's chosen sequence, then every pair's rejected one, right-padded)
    as one row per pair that holds the prefix the two share (the prompt, and any first reply tokens alike) once:
    the chosen sequence, then the rejected one's tokens after that prefix.

    Returns ``input_ids`` [pairs, T]; ``position_ids`` [pairs, T] (the rejected tail continues from the prefix);
    ``attention_mask`` [pairs, 1, T, T], True where a token may attend: causal, except that the rejected tail does
    not see the chosen tail (padding sees only itself); and ``index`` [2 * pairs, L]: where each of the batch's
    positions is in the packed rows, flattened to [pairs * T], so the hidden states unpack to the batch's layout.
    Each row's tokens then get the hidden states they get alone, computed once per pair for the shared prefix."""
    import torch

    rows, width = input_ids.shape
    if rows % 2:
        raise ValueError(f"a batch of pairs has an even number of rows (chosen, then rejected); got {rows}")
    lengths = attention_mask.sum(-1).tolist()
    if any(not attention_mask[row, :n].all() for row, n in enumerate(lengths)):
        raise ValueError("sharing prompts needs right-padded pairs (a mask of ones, then zeros)")
    pairs, spans = rows // 2, []
    for pair in range(pairs):
        chosen, rejected = input_ids[pair, : lengths[pair]], input_ids[pairs + pair, : lengths[pairs + pair]]
        common = min(len(chosen), len(rejected))
        differ = (chosen[:common] != rejected[:common]).nonzero()
        spans.append((len(chosen), len(rejected), int(differ[0, 0]) if len(differ) else common))
    size = max(chosen + rejected - shared for chosen, rejected, shared in spans)
    ids = input_ids.new_zeros(pairs, size)
    positions = torch.zeros(pairs, size, dtype=torch.long)
    mask = torch.eye(size, dtype=torch.bool).repeat(pairs, 1, 1, 1)
    index = torch.zeros(rows, width, dtype=torch.long)
    for pair, (chosen, rejected, shared) in enumerate(spans):
        end = chosen + rejected - shared
        ids[pair, :chosen] = input_ids[pair, :chosen]
        ids[pair, chosen:end] = input_ids[pairs + pair, shared:rejected]
        positions[pair, :end] = torch.cat([torch.arange(chosen), torch.arange(shared, rejected)])
        mask[pair, 0, :end, :end] = torch.ones(end, end, dtype=torch.bool).tril()
        mask[pair, 0, chosen:end, shared:chosen] = False
        start = pair * size  # padding positions point at the pair's first token: they carry no label
        index[[pair, pairs + pair]] = start
        index[pair, :chosen] += torch.arange(chosen)
        index[pairs + pair, :rejected] += torch.cat([torch.arange(shared), torch.arange(chosen, end)])
    return ids, positions, mask, index


def backbone_of(causal_lm):
    """The transformer under a ``*ForCausalLM`` (before or after PEFT wraps it)."""
    return causal_lm.get_base_model().base_model if hasattr(causal_lm, "get_base_model") else causal_lm.base_model


@contextlib.contextmanager
def pairs_packed(causal_lm):
    """Within it, ``causal_lm``'s backbone runs each DPO pair's shared prefix once: forward hooks pack the batch
    (``pack_pairs``) on the way in and unpack the hidden states on the way out; leaving removes the hooks.

    An HH pair repeats a whole dialogue, most of its tokens, in the chosen and the rejected sequence, and TRL pads
    the shorter one to the longer; packed, a pair costs its prompt once and no padding. Needs a model that takes
    ``position_ids`` and a 4-D boolean attention mask, as transformers' Llama and GPT-2 do."""
    backbone = backbone_of(causal_lm)
    unpack_index = []  # pack's index for the call under way, read back by unpack

    def pack(module, args, kwargs):
        input_ids, attention_mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
        if input_ids is None or attention_mask is None or kwargs.get("position_ids") is not None:
            raise ValueError("sharing prompts needs input_ids and a 2-D attention mask, without position_ids")
        ids, positions, mask, index = pack_pairs(input_ids.cpu(), attention_mask.cpu())
        device = input_ids.device
        unpack_index.append(index.to(device))
        return (), {**kwargs, "input_ids": ids.to(device), "attention_mask": mask.to(device),
                    "position_ids": positions.to(device)}  # fmt: skip

    def unpack(module, args, kwargs, output):
        hidden = output.last_hidden_state
        output.last_hidden_state = hidden.reshape(-1, hidden.shape[-1])[unpack_index.pop()]
        return output

    handles = [backbone.register_forward_pre_hook(pack, with_kwargs=True),
               backbone.register_forward_hook(unpack, with_kwargs=True)]  # fmt: skip
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def completions_only_lm_head():
    """Within it, TRL's fused LM head projects only the positions that carry a label (the completions), on every
    device; leaving restores TRL's choice.

    TRL's DPO forward (``fused_lm_head=True``) compacts the hidden states to the labelled positions only where
    ``trl.trainer.utils._use_triton`` says so (CUDA/XPU); elsewhere it projects every position through the 49k-word
    head, prompt tokens included, to keep tile shapes fixed for compilers that need that (Neuron). An eager CPU run
    has no such need, and an HH prompt is most of its pair's tokens. TRL has no option for it, so this rebinds that
    one function for the duration (the trainer runs its passes on one thread) and puts TRL's back after.
    """
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def fast_dpo_trainer(trainer_class):
    """``FastDPOTrainer``: a subclass of ``trainer_class`` (TRL's ``DPOTrainer`` or a subclass of it)."""

    class FastDPOTrainer(trainer_class):
        """A ``DPOTrainer`` with two speed-ups, each off unless asked for:

        - ``share_prompts``: each pair's shared prefix runs once through the policy and the reference
          (``pairs_packed``);
        - ``completions_only``: the LM head projects the completion positions only (``completions_only_lm_head``).

        Overrides ``compute_loss`` and ``compute_ref_log_probs`` (TRL calls the latter from ``__init__`` when it
        precomputes the reference's log-probs), each wrapped in ``speed_ups()``; nothing else changes."""

        def __init__(self, *args, share_prompts: bool = False, completions_only: bool = False, **kwargs):
            self.share_prompts, self.completions_only = share_prompts, completions_only  # read during __init__
            super().__init__(*args, **kwargs)

        @contextlib.contextmanager
        def speed_ups(self):
            if getattr(self, "_speeding_up", False):  # already on: a pass inside a pass
                yield
                return
            self._speeding_up = True
            with contextlib.ExitStack() as stack:
                stack.callback(setattr, self, "_speeding_up", False)
                if self.share_prompts:
                    for model in {id(m): m for m in (self.model, self.ref_model) if m is not None}.values():
                        stack.enter_context(pairs_packed(self.accelerator.unwrap_model(model)))
                if self.completions_only:
                    stack.enter_context(completions_only_lm_head())
                yield

        def compute_loss(self, *args, **kwargs):
            with self.speed_ups():
                return super().compute_loss(*args, **kwargs)

        def compute_ref_log_probs(self, *args, **kwargs):
            with self.speed_ups():
                return super().compute_ref_log_probs(*args, **kwargs)

    return FastDPOTrainer
