"""Training speed levers that TRL does not expose as options."""

from __future__ import annotations


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
