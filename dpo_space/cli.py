"""What every command-line entry point of the project starts with: one log format, and a parser whose help is the
module's docstring (which holds the exact command to run it)."""

from __future__ import annotations

import argparse
import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)


def command_parser(doc: str | None) -> argparse.ArgumentParser:
    """Logging set up, and an ``ArgumentParser`` described by ``doc`` (a module's ``__doc__``), as written."""
    setup_logging()
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
