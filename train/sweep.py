"""Run a recipe over a grid of values, one output directory per point; an interrupted sweep resumes.

    python -m train.sweep --config train/recipes/smollm2-hh-lora.yaml \\
        --grid learning_rate=5e-6,5e-7,5e-8 [--grid beta=0.1,0.5] [--grid "loss_weights=1 0,1 1"] \\
        [--output_dir outputs/sweep] [-- --max_samples 64]

Values are separated by commas; a list value (``loss_weights``) by spaces within one value.

Each point runs ``python -m train.dpo`` in its own process. A point whose ``train_results.json`` exists is
finished and skipped; a point with checkpoints resumes from the last one. ``sweep.json`` lists the points.
"""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
from pathlib import Path

from dpo_space.cli import command_parser
from train.checkpoints import last_complete_checkpoint

logger = logging.getLogger(__name__)


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """``["learning_rate=1e-5,1e-6", "beta=0.1"]`` -> ``{"learning_rate": ["1e-5", "1e-6"], "beta": ["0.1"]}``."""
    grid = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values or "" in values.split(","):
            raise ValueError(f"--grid {spec!r}: expected KEY=VALUE[,VALUE...]")
        if key in grid:
            raise ValueError(f"--grid {key} is given twice")
        grid[key] = values.split(",")
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def point_name(point: dict[str, str]) -> str:
    return ",".join(f"{k}={v.replace(' ', '_')}" for k, v in point.items())


def point_command(config: str, point: dict[str, str], run_dir: Path, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "train.dpo", "--config", config, *extra]
    for key, value in point.items():
        command += [f"--{key}", *value.split()]  # a list value ("1.0 0.5") is several words
    command += ["--output_dir", str(run_dir)]
    if last_complete_checkpoint(run_dir) is not None:
        command += ["--resume_from_checkpoint", "last"]
    return command


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = command_parser(__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--grid", action="append", required=True, help="KEY=V1,V2,... (repeatable)")
    parser.add_argument("--output_dir", default="outputs/sweep")
    args = parser.parse_args(argv)

    points = grid_points(parse_grid(args.grid))
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    summary = []
    for point in points:
        run_dir = root / point_name(point)
        if (run_dir / "train_results.json").is_file():
            logger.info("%s: finished, skipped", run_dir.name)
            status = "skipped (finished)"
        else:
            command = point_command(args.config, point, run_dir, extra)
            logger.info("%s: %s", run_dir.name, " ".join(command))
            subprocess.run(command, check=True)
            status = "trained"
        summary.append({"point": point, "output_dir": str(run_dir), "status": status})
        (root / "sweep.json").write_text(json.dumps({"config": args.config, "extra": extra, "runs": summary},
                                                    indent=2) + "\n")  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
