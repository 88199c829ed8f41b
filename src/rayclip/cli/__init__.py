"""`rayclip` command line: one subcommand per stage, its flags generated from rayclip.options. The only
module that prints; heavy libraries (torch, ray, faiss) are imported by the commands that use them
(--help is instant).

parser.py builds the parser, commands.py holds a handler per command, show.py (and bars.py) what
they print; here, a handler's UserError becomes one line on stderr and its exit code.
"""

from __future__ import annotations

import sys

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
    sys.exit(main(owns_process=True))
