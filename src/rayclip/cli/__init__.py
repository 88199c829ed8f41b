"""`rayclip` command line: one subcommand per stage, its flags generated from rayclip.options. The only
module that prints; heavy libraries (torch, ray, faiss) are imported by the commands that use them
(--help is instant).

parser.py builds the parser, commands.py holds a handler per command, show.py (and bars.py) what
they print; here, a handler's UserError becomes one line on stderr and its exit code.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

from ..errors import UnknownModelVersionError, UserError
from . import show
from .parser import COMMANDS, build_parser

__all__ = ["COMMANDS", "build_parser", "main", "run"]


def main(argv: list[str] | None = None, owns_process: bool = False) -> int:
    """Runs one command; its exit code. `owns_process`: called as the process's own entry point."""
    args = build_parser().parse_args(argv)
    show.start(as_json=getattr(args, "json", False), owns_process=owns_process)
    try:
        return args.func(args)
    except UserError as err:
        shown = err.named_by("--model-version") if isinstance(err, UnknownModelVersionError) else err
        print(f"rayclip {args.command}: error: {shown}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"rayclip {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        show.finish()


def run() -> None:
    """The `rayclip` command: main() in a process of its own, its exit code the process's."""
    _exit(main(owns_process=True))


def _exit(code: int) -> None:
    """Ends the process as Python's own exit would, less the teardown of every module.

    By now the command's work is committed (temp + rename, records last). A normal exit then joins the
    threads, runs the exit handlers (Ray's shut-down, logging's flush) and tears every module down:
    seconds with torch loaded, for nothing. So the first two run here, and the process ends."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # the handlers a normal exit runs; no public name for it
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        stream.flush()
    os._exit(code)
