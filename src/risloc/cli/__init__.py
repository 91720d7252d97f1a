"""The ``risloc`` command: one sub-command per job, each a thin call into the library.

Each sub-command lives in its own module ``risloc.cli.<name>`` that defines
``add_parser(subparsers)`` (which registers the parser and sets ``func``).

Bad input (a file that is not what it should be, an option out of range) ends the command
with one line on stderr, ``risloc COMMAND: error: <file or option>: <what is wrong>``, and exit
status 2, with no traceback: the library raises :class:`risloc._files.InputError` (or another
``ValueError``) naming the file, ``FileNotFoundError`` or a permission error, and :func:`main`
prints it. Every output file is written atomically, so a refused run leaves none behind.
Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from risloc._files import InputError

INPUT_ERRORS = (InputError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
"""What :func:`main` reports as bad input (one line, exit status 2); InputError is a ValueError,
named for the reader."""

# Order is the order of `risloc --help`.
SUBCOMMANDS = ("simulate", "locate", "evaluate", "crb", "train", "calibrate", "overfit", "bench", "hpo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="risloc",
        description="Near-field multi-source localisation through a reconfigurable intelligent surface.",
    )
    from risloc import __version__

    parser.add_argument("--version", action="version", version=f"risloc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"risloc.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"risloc.cli.{name}":
                continue  # sub-command not part of this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if isinstance(getattr(args, "device", None), str):
            from risloc._devices import check_device

            check_device(args.device)  # before any work
        return int(args.func(args) or 0)
    except INPUT_ERRORS as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message
        print(f"risloc {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"risloc {args.command}: interrupted", file=sys.stderr)
        return 130
