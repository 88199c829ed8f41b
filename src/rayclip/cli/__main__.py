"""`python -m rayclip.cli`: the `rayclip` command, in its own process."""

import sys

from . import main

sys.exit(main())
