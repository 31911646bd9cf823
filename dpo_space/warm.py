"""Compile the Space's decoder step once, ahead of serving, so that its next start loads it from the cache.

    python -m dpo_space.warm [--model MODEL_ID]

The Space compiles in the background at every start, serving eagerly meanwhile: minutes from an empty Inductor
cache, seconds from a warm one. The cache is ``COMPILE_CACHE_DIR`` (docs/configuration.md); the Dockerfile runs
this command while building the image, so a container restart starts warm on a machine like the builder's.
Prints the seconds the compilation took; exits with 1 if it failed (the Space would decode eagerly).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time

from dpo_space.cli import command_parser
from dpo_space.engine import Engine
from dpo_space.settings import SpaceSettings
from dpo_space.shipped import display_name

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    settings = SpaceSettings.from_env()
    parser = command_parser(__doc__)
    parser.add_argument("--model", default=settings.model_id)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    engine = Engine.load(args.model, settings.ref_model_id, dataclasses.replace(settings.engine, compile=True))
    loaded = time.perf_counter()
    if engine.compiling is None:
        logger.error("%s decodes with generate: there is no decoder step to compile", args.model)
        return 1
    engine.compiling.join()
    done = time.perf_counter()
    cache = settings.engine.compile_cache_dir or "Inductor's default"
    result = {"model": display_name(args.model), "compiled": engine.compiled.is_set(),
              "load_s": round(loaded - started, 1), "compile_s": round(done - loaded, 1), "cache": cache}  # fmt: skip
    print(json.dumps(result))  # noqa: T201 (the command's output)
    return 0 if result["compiled"] else 1


if __name__ == "__main__":
    sys.exit(main())
