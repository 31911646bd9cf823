"""The DPO job really trains: a tiny model, a few steps, full and LoRA, resumed, and every recipe parses."""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FIXTURE_HH, ROOT
from train.dpo import main, parse_args

RECIPES = sorted((ROOT / "train" / "recipes").glob("*.yaml"))
TINY = str(ROOT / "train" / "recipes" / "tiny.yaml")
DPO_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"}


def run_tiny(output_dir: Path, *extra: str) -> dict:
    main(["--config", TINY, "--output_dir", str(output_dir), "--dataset_name", str(FIXTURE_HH), *extra])
    return json.loads((output_dir / "train_results.json").read_text())


@pytest.mark.slow
def test_full_fine_tuning_trains_and_writes_metrics(tmp_path, tiny_path):
    results = run_tiny(tmp_path)
    assert math.isfinite(results["train_loss"])
    assert DPO_KEYS <= results.keys()
    assert len([e for e in results["log_history"] if "loss" in e]) == 4  # logging_steps 1, max_steps 4
    evaluation = json.loads((tmp_path / "eval_results.json").read_text())
    assert {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"} <= evaluation.keys()

    before = load_file(Path(tiny_path) / "model.safetensors")
    after = load_file(tmp_path / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "run_config.yaml").is_file()
    assert not list(tmp_path.glob("*.bin")) or [p.name for p in tmp_path.glob("*.bin")] == ["training_args.bin"]


@pytest.mark.slow
def test_lora_changes_only_adapter_weights(tmp_path, tiny_path):
    run_tiny(tmp_path, "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"  # portable name, not this machine's cache path
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert checkpoints and all(json.loads((c / "adapter_config.json").read_text())["base_model_name_or_path"] ==
                               "tiny" for c in checkpoints)  # a checkpoint evaluates anywhere too  # fmt: skip
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0

    from dpo_space.models import load_model

    loaded = load_model(str(tmp_path))
    assert loaded.is_adapter and loaded.base == "tiny"
    base = load_file(Path(tiny_path) / "model.safetensors")
    merged = loaded.model.merge_and_unload()
    merged_state = merged.state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged_state[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


@pytest.mark.slow
def test_lora_on_the_top_layers_only_trains_those(tmp_path, tiny_path):
    """--lora_top_layers 1: the adapter holds the last layer's LoRA weights only, and they trained."""
    total = json.loads((Path(tiny_path) / "config.json").read_text())["num_hidden_layers"]
    run_tiny(tmp_path, "--use_peft", "true", "--lora_r", "4", "--lora_top_layers", "1", "--max_steps", "2")
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    assert adapter and all(f".layers.{total - 1}." in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    with pytest.raises(ValueError, match=rf"lora_top_layers must be in \[1, {total}\] for this model; got 0"):
        run_tiny(tmp_path / "zero", "--use_peft", "true", "--lora_top_layers", "0")
    with pytest.raises(ValueError, match="lora_top_layers needs use_peft: true"):
        run_tiny(tmp_path / "full", "--lora_top_layers", "1")


@pytest.mark.slow
def test_lora_on_listed_layers_only_trains_those(tmp_path, tiny_path):
    """--lora_layers 0: the adapter holds the first layer's LoRA weights only (a band lora_top_layers cannot name)."""
    total = json.loads((Path(tiny_path) / "config.json").read_text())["num_hidden_layers"]
    run_tiny(tmp_path, "--use_peft", "true", "--lora_r", "4", "--lora_layers", "0", "--max_steps", "1")
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    assert adapter and all(".layers.0." in k for k in adapter)
    with pytest.raises(ValueError, match=rf"lora_layers must list layer indices in \[0, {total - 1}\] for this "
                                         rf"model; got \[0, {total}\]"):  # fmt: skip
        run_tiny(tmp_path / "outside", "--use_peft", "true", "--lora_layers", "0", str(total))
    with pytest.raises(ValueError, match="Set lora_top_layers or lora_layers, not both"):
        run_tiny(tmp_path / "both", "--use_peft", "true", "--lora_layers", "0", "--lora_top_layers", "1")
    with pytest.raises(ValueError, match="lora_layers needs use_peft: true"):
        run_tiny(tmp_path / "full", "--lora_layers", "0")


@pytest.mark.slow
def test_lora_probe_readers_keep_a_on_the_probe_direction_and_train_only_b(tmp_path, tiny_path):
    run_tiny(tmp_path, "--use_peft", "true", "--lora_r", "2", "--lora_target_modules", "q_proj", "up_proj",
             "--lora_probe_readers", "true")  # fmt: skip
    first = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    last = load_file(tmp_path / "adapter_model.safetensors")
    a_keys = [k for k in last if "lora_A" in k]
    assert len(a_keys) == 4  # 2 layers x (q_proj, up_proj)
    assert all(torch.equal(first[k], last[k]) and torch.equal(last[k][0], last[k][1]) for k in a_keys)
    assert any(not torch.equal(first[k], last[k]) for k in last if "lora_B" in k)

    from dpo_space.models import load_model
    from train.probe import HARMFUL_FILES, HARMLESS_FILES, probe_requests
    from train.probe_readers import probe_directions

    loaded = load_model(tiny_path)
    harmful, harmless = probe_requests(HARMFUL_FILES, HARMLESS_FILES, str(FIXTURE_HH), 0.25, 42)
    directions = probe_directions(loaded.model, loaded.tokenizer, [0, 1], harmful, harmless)
    for layer in (0, 1):
        norm = loaded.model.model.layers[layer].input_layernorm.weight.detach()
        a = last[next(k for k in a_keys if f".layers.{layer}.self_attn.q_proj." in k)][0]
        assert torch.nn.functional.cosine_similarity(a, directions[layer] / norm, dim=0) > 0.999

    resumed = tmp_path / "resumed"  # no probe fitted again: the checkpoint's readers load, and stay frozen
    run_tiny(resumed, "--use_peft", "true", "--lora_r", "2", "--lora_target_modules", "q_proj", "up_proj",
             "--lora_probe_readers", "true", "--resume_from_checkpoint", str(tmp_path / "checkpoint-2"))  # fmt: skip
    after = load_file(resumed / "adapter_model.safetensors")
    assert all(torch.equal(first[k], after[k]) for k in a_keys)
    assert any(not torch.equal(first[k], after[k]) for k in after if "lora_B" in k)

    with pytest.raises(ValueError, match="o_proj cannot read a probe"):
        run_tiny(tmp_path / "o", "--use_peft", "true", "--lora_target_modules", "q_proj", "o_proj",
                 "--lora_probe_readers", "true")  # fmt: skip
    with pytest.raises(ValueError, match="lora_probe_readers needs use_peft: true"):
        run_tiny(tmp_path / "full", "--lora_probe_readers", "true")


@pytest.mark.slow
def test_precomputed_reference_log_probs_train(tmp_path, tiny_path):
    results = run_tiny(tmp_path, "--precompute_ref_log_probs", "true", "--max_steps", "2")
    assert math.isfinite(results["train_loss"]) and DPO_KEYS <= results.keys()


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint_step(tmp_path, tiny_path):
    run_tiny(tmp_path, "--max_steps", "2")
    checkpoint = tmp_path / "checkpoint-2"
    assert checkpoint.is_dir()
    results = run_tiny(tmp_path, "--max_steps", "4", "--resume_from_checkpoint", str(checkpoint))
    steps = [e["step"] for e in results["log_history"] if "loss" in e]
    assert steps == [1, 2, 3, 4]  # the first two come from the checkpoint's state
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_strictly(recipe):
    script_args, training_args, model_args = parse_args(["--config", str(recipe)])
    assert model_args.model_name_or_path and training_args.report_to == []
    assert training_args.remove_unused_columns is False


def test_original_recipe_keeps_the_original_configuration():
    script_args, args, model_args = parse_args(["--config", str(ROOT / "train/recipes/gpt2-hh.yaml")])
    assert model_args.model_name_or_path == "openai-community/gpt2"
    assert script_args.dataset_name == "Anthropic/hh-rlhf" and script_args.max_samples == 1000
    assert (args.num_train_epochs, args.learning_rate, args.per_device_train_batch_size) == (3, 5e-7, 1)
    assert (args.adam_epsilon, args.lr_scheduler_type.value, args.warmup_steps, args.seed) == (1e-8, "linear", 0.1, 42)
    assert (args.logging_steps, args.save_steps, args.gradient_checkpointing) == (100, 100, True)
    assert script_args.precision == "auto"  # bf16 as the original recipe, where the machine runs it natively


@pytest.mark.slow
def test_the_mixed_recipe_trains_dpo_with_the_sft_term_on_both_sources(tmp_path, tiny_path):
    results = run_tiny(tmp_path, "--helpful_dataset_name", str(FIXTURE_HH.parent / "pandalm_tiny.json"),
                       "--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "1.0")  # fmt: skip
    assert results["train_pairs"] == 12 + 5  # 6 usable PandaLM pairs, one (0.2) held out
    assert math.isfinite(results["train_loss"])
    import yaml

    config = yaml.safe_load((tmp_path / "run_config.yaml").read_text())
    assert config["training"]["loss_type"] == ["sigmoid", "sft"] and config["training"]["loss_weights"] == [1.0, 1.0]
    assert config["command"].startswith("python -m train.dpo --config ") and str(ROOT) not in config["command"]


def test_unknown_recipe_key_is_an_error(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(Path(TINY).read_text() + "learning_rat: 1.0e-5\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_args(["--config", str(recipe)])


@pytest.mark.slow
def test_original_recipe_runs_with_local_model_and_data(tmp_path, tiny_path):
    main(
        [
            "--config", str(ROOT / "train/recipes/gpt2-hh.yaml"),
            "--model_name_or_path", "tiny",
            "--dataset_name", str(FIXTURE_HH),
            "--eval_fraction", "0.25",
            "--max_steps", "1",
            "--max_length", "128",
            "--output_dir", str(tmp_path),
        ]
    )  # fmt: skip
    results = json.loads((tmp_path / "train_results.json").read_text())
    assert max(e["step"] for e in results["log_history"]) == 1
    assert math.isfinite(results["train_loss"])


@pytest.mark.slow
def test_embedded_recipe_trains_two_steps_on_real_data(tmp_path, real_hh):
    main(["--config", str(ROOT / "train/recipes/smollm2-hh.yaml"), "--max_steps", "2", "--max_eval_samples", "8",
          "--dataset_name", str(real_hh), "--output_dir", str(tmp_path)])  # fmt: skip
    results = json.loads((tmp_path / "train_results.json").read_text())
    assert math.isfinite(results["train_loss"]) and (tmp_path / "model.safetensors").is_file()

    from dpo_space.models import load_model

    loaded = load_model(str(tmp_path))
    assert loaded.model.config.model_type == "llama" and not loaded.is_adapter


def torchrun(command: list[str], log: Path, timeout: float) -> int | None:
    """Run a ``torchrun`` launch with its stderr in ``log``: its exit code, or None when it ran past ``timeout``
    (then it is killed; a rank stuck in its own session may stay behind, holding no pipe of ours)."""
    import subprocess

    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None


@pytest.mark.slow
def test_two_processes_train_together_and_write_one_checkpoint(tmp_path, tiny_path):
    """``torchrun --standalone --nproc_per_node 2``: two gloo ranks on the CPU, as DDP would run on two GPUs.
    ``--standalone`` rendezvous on a free port, so another launch on the same host cannot join this one.

    About 10 s when healthy. Under the full suite's load a launch once stayed alive after rank 0 had saved everything
    (both ranks past training, in the final barrier or the process group's teardown), so a launch that outlives
    150 s is killed and tried once more in a fresh folder; a second one failing fails the test."""
    import sys

    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "train.dpo", "--config", TINY, "--dataset_name", str(FIXTURE_HH)]  # fmt: skip
    for attempt in ("first", "second"):
        out = tmp_path / f"ddp-{attempt}"
        log = tmp_path / f"torchrun-{attempt}.log"
        returncode = torchrun([*launch, "--output_dir", str(out)], log, timeout=150)
        stderr = log.read_text(errors="replace")
        if returncode is not None:
            break
        warnings.warn(f"torchrun's {attempt} launch did not finish in 150 s; the end of its output:\n{stderr[-3000:]}",
                      stacklevel=1)  # fmt: skip
    else:
        pytest.fail("torchrun did not finish in 150 s, twice (its output is in the warnings above)")
    assert returncode == 0, stderr[-3000:]
    assert "Rank 0 of 2 trained 4 steps" in stderr and "Rank 1 of 2 trained 4 steps" in stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    last = out / "checkpoint-4"
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "trainer_state.json"} <= {
        p.name for p in last.iterdir()
    } and not (last / ".incomplete").exists()
    results = json.loads((out / "train_results.json").read_text())
    assert results["world_size"] == 2 and math.isfinite(results["train_loss"])
    assert [e["step"] for e in results["log_history"] if "loss" in e] == [1, 2, 3, 4]
    assert DPO_KEYS <= results.keys() and (out / "eval_results.json").is_file()


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero2", "zero3"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "train" / "accelerate" / f"{name}.yaml"))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}[name]
    assert config.distributed_type.value == expected and config.mixed_precision == "bf16"


def test_completion_logits_only_gives_the_same_log_probs_from_the_completion_rows(tiny_path, monkeypatch):
    """train/speed.py: TRL's fused LM head then projects only the labelled (completion) positions on the CPU, and
    only within ``completions_only_lm_head()``."""
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM
    from trl.kernels.chunked_logprob import _use_triton

    from train.speed import completions_only_lm_head

    projected = []
    chunked = trl_utils._ChunkedLogProbFunction

    class Counting:
        @staticmethod
        def apply(hidden, *args):
            projected.append(hidden.shape[0])
            return chunked.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counting)
    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    trl_utils.add_fused_lm_head(model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    labels = ids.masked_fill(torch.arange(8) < 5, -100)  # a 5-token prompt, a 3-token completion
    with torch.no_grad():
        every = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        with completions_only_lm_head():
            compact = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert projected == [7, 3, 7]  # all 7 shifted positions, the 3 labelled ones, then all 7 again after it
    assert trl_utils._use_triton is _use_triton  # TRL's own, back
    assert torch.allclose(every, compact, atol=1e-5) and every[0, 4:].abs().min() > 0


def test_pack_pairs_holds_each_shared_prefix_once():
    from train.speed import pack_pairs

    # pairs (chosen, rejected): ([1, 2, 3, 4, 5], [1, 2, 3, 6]) share 3 tokens, ([7, 8], [7, 9, 9]) share 1
    input_ids = torch.tensor([[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 3, 6, 0], [7, 9, 9, 0, 0]])
    attention_mask = (input_ids > 0).long()
    ids, positions, mask, index = pack_pairs(input_ids, attention_mask)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 9, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 2, 0, 0]]
    assert index.tolist() == [[0, 1, 2, 3, 4], [6, 7, 6, 6, 6], [0, 1, 2, 5, 0], [6, 8, 9, 6, 6]]
    seen = [[[j for j in range(6) if mask[p, 0, i, j]] for i in range(6)] for p in range(2)]
    assert seen[0] == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 5]]
    assert seen[1] == [[0], [0, 1], [0, 2], [0, 2, 3], [4], [5]]  # padding sees only itself
    with pytest.raises(ValueError, match="even number of rows"):
        pack_pairs(input_ids[:3], attention_mask[:3])
    with pytest.raises(ValueError, match="right-padded"):
        pack_pairs(input_ids, attention_mask.flip(-1))


def tiny_gpt2(_):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def tiny_llama(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_shared_prompts_give_the_same_log_probs_and_gradients(tiny_path, build):
    """train/speed.py: each pair's prompt runs once (packed), yet every log-prob and gradient is as before."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    from train.speed import pairs_packed

    model = build(tiny_path).float().eval()  # no dropout: the same numbers twice
    add_fused_lm_head(model)
    examples = [
        {"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10, 11], "rejected_ids": [12, 13]},
        {"prompt_ids": [20, 21], "chosen_ids": [22, 23], "rejected_ids": [22, 24, 25, 26]},  # replies start alike
    ]
    batch = DataCollatorForPreference(pad_token_id=0)(examples)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)

    def log_probs_and_grads():
        model.zero_grad()
        log_probs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                          fused_lm_head=True).log_probs  # fmt: skip
        (log_probs.sum(-1) * torch.tensor([1.0, 2.0, -1.0, 3.0])).sum().backward()
        return log_probs.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    alone, alone_grads = log_probs_and_grads()
    with pairs_packed(model):
        packed, packed_grads = log_probs_and_grads()
    after, _ = log_probs_and_grads()  # the hooks are gone: computed as before
    assert torch.equal(alone, after)
    assert torch.allclose(alone, packed, atol=1e-5) and (alone != 0).sum() == 11  # the 11 reply tokens
    assert len(alone_grads) == len(packed_grads) > 0
    for a, b in zip(alone_grads, packed_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_training_with_shared_prompts_matches_training_without(tmp_path, tiny_path):
    shared = run_tiny(tmp_path / "shared")
    alone = run_tiny(tmp_path / "alone", "--share_prompts", "false")
    assert shared["train_loss"] == pytest.approx(alone["train_loss"], abs=1e-4)


@pytest.mark.slow
def test_stop_after_steps_reproduces_a_longer_runs_checkpoint(tmp_path, tiny_path):
    """stop_after_steps 2 of the tiny recipe's 4: the same losses and learning rates as the first two steps of the
    whole run (the schedule is the whole run's, not one planned for 2 steps), then it ends."""
    whole = run_tiny(tmp_path / "whole")
    stopped = run_tiny(tmp_path / "stopped", "--stop_after_steps", "2")

    def steps(results: dict) -> list[tuple]:
        return [(e["step"], e["loss"], e["learning_rate"]) for e in results["log_history"] if "loss" in e]

    assert steps(stopped) == steps(whole)[:2] and len(steps(whole)) == 4
    with pytest.raises(ValueError, match="stop_after_steps must be at least 1; got 0"):
        run_tiny(tmp_path / "none", "--stop_after_steps", "0")


def test_nll_weights_by_source():
    from train.nll import nll_weights

    assert nll_weights(["hh", "helpful", "extra"]) is None  # every source: TRL's own loss
    assert nll_weights(["helpful"]) == {"hh": 0.0, "helpful": 1.0, "extra": 0.0}
    assert nll_weights([]) == {"hh": 0.0, "helpful": 0.0, "extra": 0.0}
    with pytest.raises(ValueError, match=r"nll_sources: unknown source\(s\) \['pandalm'\]; use some of"):
        nll_weights(["pandalm"])


@pytest.mark.slow
def test_nll_sources_put_the_nll_term_on_the_listed_sources_only(tmp_path, tiny_path):
    """The tiny recipe's pairs are all HH: with the NLL term on the helpful source only it trains exactly as DPO alone,
    and with HH listed exactly as DPO plus the NLL term on every pair."""

    def losses(name: str, *extra: str) -> list[float]:
        results = run_tiny(tmp_path / name, *extra)
        return [e["loss"] for e in results["log_history"] if "loss" in e]

    dpo = losses("dpo", "--loss_type", "sigmoid")
    both = losses("both", "--loss_type", "sigmoid", "sft", "--loss_weights", "1", "1")
    helpful_only = ["--loss_type", "sigmoid", "sft", "--loss_weights", "1", "1", "--nll_sources"]
    assert losses("helpful", *helpful_only, "helpful") == pytest.approx(dpo, abs=1e-6)
    assert losses("hh", *helpful_only, "hh", "helpful") == pytest.approx(both, abs=1e-6)
    assert both != pytest.approx(dpo, abs=1e-3)  # the term is there to be taken away
    with pytest.raises(ValueError, match="nll_sources needs remove_unused_columns: false"):
        losses("dropped", *helpful_only, "helpful", "--remove_unused_columns", "true")


@pytest.mark.slow
def test_a_checkpoint_ships_as_the_run_stopped_at_its_step(tmp_path, tiny_path):
    """train.ship of checkpoint-2 (of 4): the adapter in bf16, the command that reproduces it (--stop_after_steps 2),
    the training log up to step 2, a card; a checkpoint outside a finished run is refused clearly."""
    import shutil

    from dpo_space.run_record import RunRecord
    from train.ship import ship

    run = tmp_path / "run"
    run_tiny(run, "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj")
    target = ship(run / "checkpoint-2", tmp_path / "shipped")

    record = RunRecord.read(target)
    assert record.command.endswith("--lora_target_modules q_proj v_proj --stop_after_steps 2")
    assert record.sections["script"]["stop_after_steps"] == 2
    results = json.loads((target / "train_results.json").read_text())
    assert [e["step"] for e in results["log_history"] if "loss" in e] == [1, 2] and results["global_step"] == 2
    shipped = load_file(target / "adapter_model.safetensors")
    trained = load_file(run / "checkpoint-2" / "adapter_model.safetensors")
    assert shipped.keys() == trained.keys()
    assert all(torch.equal(shipped[k], trained[k].to(torch.bfloat16)) for k in shipped)
    assert "--stop_after_steps 2" in (target / "README.md").read_text()  # the card's command to reproduce it

    shutil.copytree(run / "checkpoint-2", tmp_path / "loose" / "checkpoint-2")
    with pytest.raises(ValueError, match="ship a checkpoint of a finished train.dpo run"):
        ship(tmp_path / "loose" / "checkpoint-2", tmp_path / "refused")
