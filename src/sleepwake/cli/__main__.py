"""`python -m sleepwake.cli`."""

import sys

from sleepwake.cli import main

sys.exit(main())
