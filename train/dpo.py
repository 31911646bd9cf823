"""DPO fine-tuning on Anthropic HH-RLHF with TRL.

    python -m train.dpo --config train/recipes/smollm2-hh.yaml [--key value ...]

A recipe (YAML) sets the script's own arguments, ``DPOConfig`` and ``ModelConfig``; command-line flags
override it; an unknown key is an error. Writes the model (or LoRA adapter) and tokenizer as safetensors,
``run_config.yaml``, ``train_results.json`` and ``eval_results.json`` to ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dpo_space.cli import setup_logging

logger = logging.getLogger(__name__)

DPO_METRIC_PREFIXES = ("loss", "rewards/", "logps/", "logits/")


@dataclass
class ScriptArguments:
    """Where the preference pairs come from and how to cut them."""

    dataset_name: str = field(
        default="Anthropic/hh-rlhf",
        metadata={"help": "Hub dataset id, or a local .jsonl / .jsonl.gz file of HH-RLHF rows."},
    )
    dataset_data_dir: str | None = field(default=None, metadata={"help": "Hub data_dir, e.g. harmless-base."})
    dataset_train_split: str = field(default="train", metadata={"help": "Hub split to train on."})
    dataset_test_split: str | None = field(
        default="test", metadata={"help": "Hub split to evaluate on (ignored when eval_fraction > 0)."}
    )
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Hold out this share of the training rows (seeded) instead of a test split."}
    )
    max_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N rows only."})
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "Skip (and count) rows that are not a valid HH pair instead of failing."}
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model for full fine-tuning (default: a copy of the policy)."}
    )
    completion_logits_only: bool = field(
        default=True,
        metadata={"help": "Project the LM head at completion positions only (TRL does so on CUDA; on CPU it scores "
                          "every position, prompt included). Same log-probs, less work (train/speed.py)."},
    )  # fmt: skip
    share_prompts: bool = field(
        default=True,
        metadata={"help": "Run the prefix a pair's two sequences share (its prompt) once, not once per sequence, "
                          "and pad neither. Same log-probs, less work (train/speed.py)."},
    )  # fmt: skip
    helpful_dataset_name: str | None = field(
        default=None,
        metadata={"help": "PandaLM's testset-v1.json(.gz): its unanimous human verdicts on everyday helpful tasks are "
                          "mixed into the training pairs (a held-out share kept back), a counterweight to HH's "
                          "red-team dialogues."},
    )  # fmt: skip
    helpful_eval_fraction: float = field(
        default=0.2, metadata={"help": "Hold out this share of the helpful pairs (seeded) for evaluation."}
    )
    helpful_max_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N helpful pairs only."}
    )
    extra_dataset_files: list[str] = field(
        default_factory=list,
        metadata={"help": "Local .jsonl(.gz) files of further pairs, HH rows or TRL conversational preference rows "
                          "(such as the Space's votes from python -m train.feedback export), all joining the "
                          "training pairs."},
    )  # fmt: skip
    precision: str = field(
        default="auto",
        metadata={"help": "auto: bf16 autocast where the hardware runs it natively (CUDA with bf16, or a CPU with "
                          "amx_bf16 / avx512_bf16), else fp32; bf16 or fp32 force it. Decides DPOConfig's bf16."},
    )  # fmt: skip
    stop_after_steps: int | None = field(
        default=None,
        metadata={"help": "End training after this many optimizer steps, the learning-rate schedule still that of the "
                          "whole run: a checkpoint of a longer run, reproduced (the shipped adapter is step 50 of "
                          "smollm2-mix-balanced-lora.yaml's 149)."},
    )  # fmt: skip
    nll_sources: list[str] = field(
        default_factory=lambda: ["hh", "helpful", "extra"],
        metadata={"help": "With loss_type sft: the sources whose chosen replies the NLL term trains on (hh, helpful, "
                          "extra); the preference term still learns from every pair (train/nll.py)."},
    )  # fmt: skip
    lora_top_layers: int | None = field(
        default=None,
        metadata={"help": "LoRA on the top N decoder layers only (with use_peft): the backward pass stops below "
                          "them, so it costs less time and memory."},
    )  # fmt: skip
    lora_layers: list[int] | None = field(
        default=None,
        metadata={"help": "LoRA on these decoder layers only (0-based indices, with use_peft), for a band of layers "
                          "that lora_top_layers cannot name (docs/alignment: readers on layers 17 to 23)."},
    )  # fmt: skip
    lora_probe_readers: bool = field(
        default=False,
        metadata={"help": "With use_peft: each LoRA module's A reads its layer's input along a linear probe of "
                          "harmful against harmless requests (train/probe.py's requests) and stays frozen; training "
                          "learns only what to write. lora_target_modules must be among q/k/v/gate/up_proj "
                          "(train/probe_readers.py)."},
    )  # fmt: skip


def parse_args(argv: list[str] | None = None):
    import torch
    from trl import DPOConfig, ModelConfig, TrlParser

    from train.precision import choose_bf16, read_cpuinfo

    argv = list(sys.argv[1:] if argv is None else argv)  # a copy: the flags added below are not the user's
    if not torch.cuda.is_available() and "--use_cpu" not in argv:
        argv += ["--use_cpu", "true"]  # lets bf16 recipes run unchanged on a CPU (autocast, AMX where present)
    parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    bf16, why = choose_bf16(script_args.precision, torch.cuda.is_available(),
                            torch.cuda.is_available() and torch.cuda.is_bf16_supported(), read_cpuinfo())  # fmt: skip
    logger.info("Precision: %s (%s)", "bf16 autocast" if bf16 else "fp32", why)
    if training_args.bf16 != bf16 or training_args.fp16:  # parse again, so every derived setting agrees
        argv += ["--bf16", str(bf16).lower(), "--fp16", "false"]
        script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is not set: give it in the recipe or as --model_name_or_path")
    return script_args, training_args, model_args


def load_helpful_pairs(script_args: ScriptArguments, tokenizer, seed: int) -> tuple[list[dict], list[dict]]:
    """Formatted PandaLM train and held-out rows (empty lists when no helpful dataset is set)."""
    from train.data import convert_pandalm, read_json_list, split_train_eval

    name = script_args.helpful_dataset_name
    if not name:
        return [], []
    rows = convert_pandalm(read_json_list(name), tokenizer, name)
    train, held_out = split_train_eval(rows, script_args.helpful_eval_fraction, seed)
    return train[: script_args.helpful_max_samples], held_out


def load_pairs(script_args: ScriptArguments, tokenizer, seed: int):
    """Formatted train and eval rows (``prompt``/``chosen``/``rejected``) as ``datasets.Dataset``: HH-RLHF, plus the
    helpful pairs' training share when ``helpful_dataset_name`` is set. The eval rows are HH's alone
    (``train.evaluate`` reports each source apart)."""
    from datasets import Dataset

    from train.data import convert_rows, is_local_file, load_hh_rows, read_jsonl, split_train_eval
    from train.nll import WEIGHT_KEY, nll_weights

    name = script_args.dataset_name
    rows = list(load_hh_rows(name, script_args.dataset_data_dir, script_args.dataset_train_split))
    if script_args.eval_fraction > 0:
        train_rows, eval_rows = split_train_eval(rows, script_args.eval_fraction, seed)
    elif script_args.dataset_test_split and not is_local_file(name):
        train_rows = rows
        eval_rows = list(load_hh_rows(name, script_args.dataset_data_dir, script_args.dataset_test_split))
    else:
        train_rows, eval_rows = rows, []
    train_rows = train_rows[: script_args.max_samples]
    eval_rows = eval_rows[: script_args.max_eval_samples]

    skip = script_args.skip_bad_rows
    train, _ = convert_rows(train_rows, tokenizer, f"{name} (train)", skip_bad_rows=skip)
    evaluation, _ = (
        convert_rows(eval_rows, tokenizer, f"{name} (eval)", skip_bad_rows=skip) if eval_rows else ([], None)
    )
    if not train:
        raise ValueError(f"{name}: no usable training pairs; check the file and skip_bad_rows")
    helpful, _ = load_helpful_pairs(script_args, tokenizer, seed)
    if helpful:
        logger.info("Mixing %d helpful pairs into %d HH pairs", len(helpful), len(train))
    extra = []
    for path in script_args.extra_dataset_files:
        rows, _ = convert_rows(read_jsonl(path), tokenizer, path, skip_bad_rows=skip)
        logger.info("Mixing %d pairs of %s into the training pairs", len(rows), path)
        extra += rows
    weights = nll_weights(script_args.nll_sources)
    if weights is not None:
        logger.info("NLL term on the chosen replies of: %s", ", ".join(s for s, w in weights.items() if w) or "none")
        for source, rows in (("hh", train), ("helpful", helpful), ("extra", extra)):
            for row in rows:
                row[WEIGHT_KEY] = weights[source]
    train += helpful + extra
    return Dataset.from_list(train), Dataset.from_list(evaluation) if evaluation else None


def dpo_metrics(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k.split("eval_", 1)[-1].startswith(DPO_METRIC_PREFIXES)}


def write_results(output_dir: str, train_metrics: dict, eval_metrics: dict | None, log_history: list) -> None:
    """``train_results.json`` (run totals, last logged DPO metrics, full log history) and ``eval_results.json``."""
    out = Path(output_dir)
    last_train_log = next((e for e in reversed(log_history) if "rewards/accuracies" in e), {})
    train = {**train_metrics, **dpo_metrics(last_train_log), "log_history": log_history}
    (out / "train_results.json").write_text(json.dumps(train, indent=2) + "\n")
    if eval_metrics is not None:
        (out / "eval_results.json").write_text(json.dumps(eval_metrics, indent=2) + "\n")


REPO_ROOT = Path(__file__).resolve().parent.parent


def portable(arg: str) -> str:
    """A command-line argument with a path inside this repository made relative to its root (the command is then
    the same on every machine)."""
    path = Path(arg)
    if path.is_absolute() and path.resolve().is_relative_to(REPO_ROOT):
        return str(path.resolve().relative_to(REPO_ROOT))
    return arg


def write_run_config(output_dir: str, script_args, training_args, model_args, argv: list[str]) -> None:
    """The run's settings, and its command as run from the repository's root (no path of this machine)."""
    from dpo_space.run_record import RunRecord

    command = shlex.join(["python", "-m", "train.dpo", *map(portable, argv)])
    RunRecord.write(output_dir, asdict(script_args), asdict(model_args), training_args.to_dict(), command)


def lora_layers(script_args, peft_config, model) -> list[int] | None:
    """The decoder layers that get LoRA (``LoraConfig.layers_to_transform``): the top ``lora_top_layers``, or the
    listed ``lora_layers``; None (every layer) when neither is set."""
    top, listed = script_args.lora_top_layers, script_args.lora_layers
    if top is None and listed is None:
        return None
    name = "lora_top_layers" if top is not None else "lora_layers"
    if top is not None and listed is not None:
        raise ValueError("Set lora_top_layers or lora_layers, not both (both say which layers get LoRA)")
    if peft_config is None:
        raise ValueError(f"{name} needs use_peft: true (it says which layers get LoRA)")
    total = model.config.num_hidden_layers
    if top is not None:
        if not 0 < top <= total:
            raise ValueError(f"lora_top_layers must be in [1, {total}] for this model; got {top}")
        return list(range(total - top, total))
    outside = [i for i in listed if not 0 <= i < total]
    if not listed or outside:
        raise ValueError(f"lora_layers must list layer indices in [0, {total - 1}] for this model; got {listed}")
    return sorted(set(listed))


def probe_directions_for(script_args, seed: int, model, tokenizer, peft_config) -> dict:
    """With ``lora_probe_readers``: the probe direction at the input of every layer the adapter changes, fitted on
    ``train.probe``'s requests (HH openers from the recipe's own HH training split); else empty."""
    if not script_args.lora_probe_readers:
        return {}
    if peft_config is None:
        raise ValueError("lora_probe_readers needs use_peft: true (it sets the LoRA modules' A)")
    from train.probe import HARMFUL_FILES, HARMLESS_FILES, probe_requests
    from train.probe_readers import probe_directions

    layers = peft_config.layers_to_transform or list(range(model.config.num_hidden_layers))
    harmful, harmless = probe_requests(HARMFUL_FILES, HARMLESS_FILES, script_args.dataset_name,
                                       script_args.eval_fraction, seed)  # fmt: skip
    return probe_directions(model, tokenizer, layers, harmful, harmless)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, training_args, model_args = parse_args(argv)

    from trl import DPOTrainer, get_peft_config

    from dpo_space.models import load_causal_lm, load_tokenizer
    from train.card import write_card
    from train.checkpoints import CheckpointMarks, StopAfterSteps, record_adapter_base, resolve_resume
    from train.nll import nll_by_source_trainer
    from train.probe_readers import set_lora_readers
    from train.report import write_report
    from train.speed import fast_dpo_trainer

    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)  # fail before loading
    stop = [] if script_args.stop_after_steps is None else [StopAfterSteps(script_args.stop_after_steps)]
    name = model_args.model_name_or_path
    tokenizer = load_tokenizer(name)
    train_dataset, eval_dataset = load_pairs(script_args, tokenizer, training_args.seed)
    logger.info("Pairs: %d train, %d eval", len(train_dataset), len(eval_dataset) if eval_dataset else 0)

    model = load_causal_lm(name, dtype=model_args.dtype)
    peft_config = get_peft_config(model_args)
    layers = lora_layers(script_args, peft_config, model)
    if layers is not None:
        peft_config.layers_to_transform = layers
    # A resumed run's checkpoint holds its readers: fitting the probe again would only be overwritten
    seed = training_args.seed
    directions = None if resume else probe_directions_for(script_args, seed, model, tokenizer, peft_config)
    ref_model = None  # LoRA: the reference is the policy with its adapter disabled, no second copy
    if peft_config is None:
        ref_model = load_causal_lm(script_args.ref_model_name_or_path or name, dtype=model_args.dtype)

    trainer = nll_by_source_trainer(fast_dpo_trainer(DPOTrainer))(
        share_prompts=script_args.share_prompts,
        completions_only=script_args.completion_logits_only,
        callbacks=[CheckpointMarks(adapter_base=name if peft_config is not None else None), *stop],
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if script_args.lora_probe_readers:
        set_lora_readers(trainer.model, directions)
    result = trainer.train(resume_from_checkpoint=resume)
    state = trainer.state
    logger.info("Rank %d of %d trained %d steps", training_args.process_index, training_args.world_size,
                state.global_step)  # fmt: skip
    eval_metrics = trainer.evaluate() if eval_dataset is not None else None

    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        if peft_config is not None:
            record_adapter_base(training_args.output_dir, name)
        metrics = {**result.metrics, "world_size": training_args.world_size, "train_pairs": len(train_dataset),
                   "eval_pairs": len(eval_dataset) if eval_dataset is not None else 0}  # fmt: skip
        write_results(training_args.output_dir, metrics, eval_metrics, state.log_history)
        write_run_config(training_args.output_dir, script_args, training_args, model_args, argv)
        write_report([Path(training_args.output_dir)], Path(training_args.output_dir) / "report", title=name)
        write_card(training_args.output_dir)
        logger.info("Saved to %s", training_args.output_dir)
    # Every rank waits for rank 0's files, then leaves the process group: a rank that exits with it still open
    # can abort in gloo's teardown ("terminate called without an active exception") and fail the whole launch.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    if training_args.world_size > 1 and training_args.device.type == "cpu":
        # gloo's worker thread frees the last collectives' tensors just after the barrier has returned, and takes the
        # GIL to do it; the process group's destructor, run when this function's locals go, joins that thread while
        # holding the GIL. A rank whose worker was still freeing hung there for ever (py-spy, docs/reliability.md).
        # Releasing the GIL a moment first lets the worker finish: it narrows the race, it cannot close it.
        time.sleep(1.0)


if __name__ == "__main__":
    main()
