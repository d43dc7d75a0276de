"""``python -m sepconv``: the same as the ``sepconv`` console script."""

import sys

from sepconv.cli import main

if __name__ == "__main__":
    sys.exit(main())
