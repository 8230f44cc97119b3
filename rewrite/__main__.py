"""``python -m effcompile ...``: the same command line as the ``effcompile`` script."""

import sys

from effcompile.cli.main import main

sys.exit(main())
