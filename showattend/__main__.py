"""``python -m showattend ...`` (and ``torchrun -m showattend ...``): the command line."""

import sys

from showattend.cli import main

if __name__ == "__main__":
    sys.exit(main())
