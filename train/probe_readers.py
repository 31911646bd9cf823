"""LoRA modules that read what a linear probe reads: each one's A set to the probe's direction at its layer, frozen.

A linear probe on the hidden state at a prompt's last token tells XSTest's unsafe prompts from its safe ones far
better than any DPO run's refusals do (``train/probe.py``, docs/alignment). With ``lora_probe_readers: true`` every
LoRA module reads its layer's input along the direction of a probe fitted there (on the project's harmful and
harmless requests, never on XSTest) and keeps reading it: A is set once and frozen, and training learns only B, what
to write. Whatever such an adapter adds to the model is then in proportion to what the probe reads.

Only the modules that read the residual stream can hold such a reader: ``q_proj``, ``k_proj`` and ``v_proj`` see
the layer's input through ``input_layernorm``, ``gate_proj`` and ``up_proj`` see it, with the attention's output
added, through ``post_attention_layernorm`` (the probe of the layer's input stands in for it there). A module sees
``h * g / rms(h)`` (``g`` the norm's weight), so reading the probe's weight ``w`` over ``h`` takes ``w / g``, up to
the ``rms`` factor every row shares.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

READER_MODULES = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
                  "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}  # fmt: skip


def reader_row(probe_weight: torch.Tensor, norm_weight: torch.Tensor, row_norm: float) -> torch.Tensor:
    """The row of LoRA A that reads ``probe_weight`` (a probe over a layer's input) from the normed input a module
    sees: ``probe_weight / norm_weight``, scaled to ``row_norm`` (the norm LoRA's own initialisation gave the row)."""
    row = probe_weight.float() / norm_weight.float()
    return row * (row_norm / row.norm())


def probe_directions(model, tokenizer, layers: list[int], harmful: list[str], harmless: list[str]) -> dict:
    """Per decoder layer in ``layers``: the weight of a probe fitted on the layer's input at the requests' last
    token (harmful 1, harmless 0), over the raw hidden state."""
    from train.probe import fit_probe, last_token_states

    was_training = model.training
    model.eval()
    states = last_token_states(model, tokenizer, harmful + harmless)  # index k: the input of decoder layer k
    model.train(was_training)
    labels = torch.tensor([1] * len(harmful) + [0] * len(harmless))
    logger.info("Probe readers fitted on %d harmful and %d harmless requests, layers %d to %d", len(harmful),
                len(harmless), min(layers), max(layers))  # fmt: skip
    return {layer: fit_probe(states[:, layer], labels).weight for layer in layers}


def set_lora_readers(peft_model, directions: dict | None) -> int:
    """Set every LoRA A of ``peft_model`` to read its layer's probe direction (``reader_row``, every row alike) and
    freeze it; returns how many were set. Every adapted module must be one of ``READER_MODULES`` (in a layer of
    ``directions``). ``directions`` None: only freeze, the A that a resumed checkpoint loads being the readers."""
    layers = peft_model.get_base_model().model.layers
    count = 0
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        parts = name.split(".")
        kind, layer = parts[-1], int(parts[parts.index("layers") + 1])
        if kind not in READER_MODULES or (directions is not None and layer not in directions):
            raise ValueError(f"lora_probe_readers: {name} cannot read a probe; set lora_target_modules to some of "
                             f"{sorted(READER_MODULES)} (the modules that read the residual stream)")  # fmt: skip
        norm = getattr(layers[layer], READER_MODULES[kind]).weight.detach()
        for lora_a in module.lora_A.values():
            a = lora_a.weight
            if directions is not None:
                row = reader_row(directions[layer], norm, float(a.detach().norm(dim=1).mean()))
                with torch.no_grad():
                    a.copy_(row.to(a.dtype).expand_as(a))
            a.requires_grad_(False)
        count += 1
    logger.info("%d LoRA modules read their layer's probe direction (A frozen)", count)
    return count
