"""The ``vggt-turbo`` command. Each subcommand lives in its own module exposing ``add_parser(subparsers)``,
which registers the subcommand and sets ``func`` (called with the parsed arguments, returns the exit code)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

COMMANDS = ("vggt_turbo.app.reconstruct", "vggt_turbo.app.plan_cli", "vggt_turbo.bench",
            "vggt_turbo.bench.fidelity_cli", "vggt_turbo.app.view")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vggt-turbo", description="Faster, leaner upstream VGGT.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is patched and why")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


def run() -> None:
    """The console script (and ``python -m vggt_turbo.cli``): ``main``, then an exit that skips the interpreter's
    teardown. Why: freeing torch, the CUDA context and some two thousand modules one by one takes most of a second
    after the work is done, in a command the user waits for (``reconstruct``). Safe because every command has
    written, closed and joined all it starts before ``main`` returns; output streams and logging are flushed here.
    An exception or ``SystemExit`` (usage errors, ``--help``) leaves the ordinary way; a reader that went away
    (``vggt-turbo plan | head -1``) ends it quietly with code 1, as Python's documentation advises for SIGPIPE."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to write to the closed pipe
        code = 1
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
