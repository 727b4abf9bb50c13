"""``python -m irqd``: the same as the ``vfio-irqd`` command."""

import sys

from irqd.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
