"""`python -m sleepwake` is the `sleepwake` command."""

import sys

from sleepwake.cli import main

sys.exit(main())
