"""Training speed levers that TRL does not expose as options."""

from __future__ import annotations

import contextlib
import threading


def score_completions_only() -> None:
    """Make TRL's fused LM head project only the positions that carry a label (the completions) on every device.

    TRL's DPO forward (``fused_lm_head=True``) compacts the hidden states to the labelled positions only on
    CUDA/XPU; elsewhere it projects every position through the 49k-word head, prompt tokens included, to keep
    tile shapes fixed for compilers that need that (Neuron). An eager CPU run has no such need, and an HH prompt
    is most of its pair's tokens. The log-probabilities are the same; ``tests/test_train.py`` checks both.
    """
    import trl.trainer.utils as trl_utils

    if getattr(trl_utils._use_triton, "completions_only", False):
        return
    original = trl_utils._use_triton  # read by the fused forward only, to choose compacting

    def compact_on_cpu_too(device) -> bool:
        return device.type == "cpu" or original(device)

    compact_on_cpu_too.completions_only = True
    trl_utils._use_triton = compact_on_cpu_too


_PAIRS = threading.local()  # set while a trainer computes log-probs of a batch in TRL's pair layout


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


@contextlib.contextmanager
def pair_batches():
    """Within it, backbones patched by ``share_prompts`` take their batches as pairs (``pack_pairs``)."""
    _PAIRS.active = True
    try:
        yield
    finally:
        _PAIRS.active = False


def share_prompts(causal_lm) -> None:
    """Run each DPO pair's shared prefix once through ``causal_lm`` (a ``*ForCausalLM``, before or after PEFT wraps
    it): within ``pair_batches()``, its backbone packs the batch (``pack_pairs``) and unpacks the hidden states.

    An HH pair repeats a whole dialogue, most of its tokens, in the chosen and the rejected sequence, and TRL pads
    the shorter one to the longer; packed, a pair costs its prompt once and no padding. The log-probs are the
    same (``tests/test_train.py`` compares them and their gradients). Needs a model that takes ``position_ids``
    and a 4-D boolean attention mask, as transformers' Llama and GPT-2 do."""
    backbone = causal_lm.get_base_model().base_model if hasattr(causal_lm, "get_base_model") else causal_lm.base_model
    if getattr(backbone.forward, "shares_prompts", False):
        return
    original = backbone.forward

    def forward(input_ids=None, attention_mask=None, **kwargs):
        if not getattr(_PAIRS, "active", False):
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids is None or attention_mask is None or kwargs.get("position_ids") is not None:
            raise ValueError("sharing prompts needs input_ids and a 2-D attention mask, without position_ids")
        ids, positions, mask, index = pack_pairs(input_ids.cpu(), attention_mask.cpu())
        device = input_ids.device
        out = original(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       **kwargs)  # fmt: skip
        hidden = out.last_hidden_state
        out.last_hidden_state = hidden.reshape(-1, hidden.shape[-1])[index.to(device)]
        return out

    forward.shares_prompts = True
    backbone.forward = forward


def sharing_prompts(trainer_class):
    """A subclass of TRL's ``DPOTrainer`` (or of a subclass of it) that shares prompts (``share_prompts``) in its
    policy and its reference, and whose log-prob passes take their batches as pairs."""

    class PromptSharing(trainer_class):
        def __init__(self, *args, model=None, ref_model=None, **kwargs):
            for each in (model, ref_model):
                if each is not None:  # before TRL's __init__, which may precompute the reference's log-probs
                    share_prompts(each)
            super().__init__(*args, model=model, ref_model=ref_model, **kwargs)

        def compute_loss(self, *args, **kwargs):
            with pair_batches():
                return super().compute_loss(*args, **kwargs)

        def compute_ref_log_probs(self, *args, **kwargs):
            with pair_batches():
                return super().compute_ref_log_probs(*args, **kwargs)

    return PromptSharing
