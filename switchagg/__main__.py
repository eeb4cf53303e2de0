"""`python -m switchagg`: the `switchagg` command (compare, bench, worker, report, warmup, ...)."""

import sys

from switchagg.workers.cli import main

sys.exit(main())
