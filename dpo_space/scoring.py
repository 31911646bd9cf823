"""Log-probabilities of completions and the reference model, shared by the Space and ``train.evaluate``."""

from __future__ import annotations

import contextlib


def tokenize_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Prompt and completion ids as TRL's DPOTrainer cuts them: where ``prompt`` and ``prompt+completion`` diverge."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    cut = 0
    while cut < min(len(prompt_ids), len(full_ids)) and prompt_ids[cut] == full_ids[cut]:
        cut += 1
    return full_ids[:cut], full_ids[cut:]


def completion_logps(model, sequences: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[float]:
    """Sum of log p(completion tokens | prompt) for each ``(prompt_ids, completion_ids)``.

    Batched by length (little padding), right-padded, and the LM head projects only the positions from the batch's
    earliest completion token on (``logits_to_keep``): a prompt is most of an HH pair's tokens."""
    import torch

    device = next(model.parameters()).device
    results: list[float] = [0.0] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = [sequences[i] for i in rows]
        width = max(len(p) + len(c) for p, c in batch)
        first = max(1, min(len(p) for p, _ in batch))  # the first token that can be a scored completion token
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention = torch.zeros_like(ids)
        completion_mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, (prompt, completion) in enumerate(batch):
            n = len(prompt) + len(completion)
            ids[row, :n] = torch.tensor(prompt + completion)
            attention[row, :n] = 1
            completion_mask[row, len(prompt) : n] = True
        ids, attention, completion_mask = ids.to(device), attention.to(device), completion_mask.to(device)
        with torch.no_grad():  # logits at positions first-1 .. width-1; each predicts the next token
            logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=width - first + 1).logits
        targets = ids[:, first:]
        token_logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        for i, value in zip(rows, (token_logps * completion_mask[:, first:]).sum(dim=1).tolist(), strict=True):
            results[i] = value
    return results


class AdapterDisabled:
    """``with`` a PEFT model with its adapter switched off: the reference, with no second copy in memory."""

    def __init__(self, model):
        self.model = model
        self._context = None

    def __enter__(self):
        self._context = self.model.disable_adapter()
        self._context.__enter__()
        return self.model

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def reference_model(policy, reference=None):
    """A context giving the reference model: ``reference`` if separate, else the policy with its adapter disabled,
    else (a plain model with no recorded base) the policy itself."""
    if reference is not None:
        return contextlib.nullcontext(reference.model)
    if policy.is_adapter:
        return AdapterDisabled(policy.model)
    return contextlib.nullcontext(policy.model)


def reference_label(policy, reference=None) -> str:
    """What ``reference_model`` gives, in words."""
    if reference is not None:
        return reference.name
    if policy.is_adapter:
        return f"{policy.base} (adapter disabled)"
    return f"{policy.name} (no separate reference: the policy itself)"
