"""`python -m switch_emulator`: the same as the `switch-emulator` command."""

import sys

from switch_emulator.cli import main

sys.exit(main())
