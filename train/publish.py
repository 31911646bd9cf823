"""Upload a trained model directory to the Hugging Face Hub.

    python -m train.publish outputs/smollm2-hh-lora --repo-id ORG/NAME [--private] [--dry-run]

Uploads the model or adapter (safetensors only), tokenizer, model card, metrics, samples and plots;
never checkpoints, optimizer states or pickles. The token comes from ``HF_TOKEN`` or the login cache and is
never logged. No token, or no Hub, is an error before anything is uploaded; the local directory is only read.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

from dpo_space.cli import command_parser

logger = logging.getLogger(__name__)

ALLOW = [
    "*.safetensors", "config.json", "generation_config.json", "adapter_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "README.md", "run_config.yaml", "train_results.json", "eval_results.json",
    "eval/*.json", "eval/*.jsonl", "eval/*.md", "report/*.png", "report/*.md", "report/*.json",
]  # fmt: skip


class PublishError(RuntimeError):
    """Publishing cannot start; nothing was uploaded."""


def files_to_upload(run_dir: Path) -> list[Path]:
    """The files ``publish`` would send, relative to ``run_dir``."""
    if not run_dir.is_dir():
        raise PublishError(f"{run_dir} is not a directory; pass a train.dpo output directory")
    files = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if p.is_file())
    chosen = [p for p in files if any(_matches(p, pattern) for pattern in ALLOW)]
    if not any(p.suffix == ".safetensors" for p in chosen):
        raise PublishError(f"{run_dir} holds no .safetensors weights; train (or save) the model first")
    return chosen


def _matches(path: Path, pattern: str) -> bool:
    """Match folder by folder, so ``*.safetensors`` never takes ``checkpoint-10/model.safetensors``."""
    parts, pattern_parts = path.parts, pattern.split("/")
    return len(parts) == len(pattern_parts) and all(map(fnmatch.fnmatch, parts, pattern_parts))


def hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()  # HF_TOKEN, then the login cache
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login`; nothing was uploaded")
    return token


def check_hub(token: str) -> str:
    """The account the token belongs to; a clear error when the Hub cannot be reached or refuses the token."""
    from huggingface_hub import HfApi

    try:
        return HfApi(token=token).whoami()["name"]
    except Exception as e:  # network errors and HTTP errors alike: say what to do, not the token
        raise PublishError(
            f"cannot reach the Hugging Face Hub or the token was refused ({type(e).__name__}); "
            "check the network and HF_TOKEN; nothing was uploaded"
        ) from None


def publish(run_dir: Path, repo_id: str, private: bool = False, dry_run: bool = False) -> list[Path]:
    files = files_to_upload(run_dir)
    if dry_run:
        return files
    token = hub_token()
    user = check_hub(token)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    logger.info("Publishing %d files from %s to %s as %s", len(files), run_dir, repo_id, user)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=run_dir,
        allow_patterns=[p.as_posix() for p in files],
        commit_message=f"Upload {run_dir.name} from train.publish",
    )
    logger.info("Published https://huggingface.co/%s", repo_id)
    return files


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="print what would be uploaded and stop")
    args = parser.parse_args(argv)
    try:
        files = publish(args.run_dir, args.repo_id, args.private, args.dry_run)
    except PublishError as e:
        parser.exit(2, f"train.publish: error: {e}\n")
    if args.dry_run:
        for path in files:
            size = (args.run_dir / path).stat().st_size
            print(f"would upload {path.as_posix()} ({size:,} bytes) to {args.repo_id}")  # noqa: T201 (the listing is the output)


if __name__ == "__main__":
    main()
