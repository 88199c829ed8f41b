"""`python -m rayclip.cli`: the `rayclip` command, in its own process."""

from . import run

run()
