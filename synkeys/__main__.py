"""``python -m synkeys``: the same as the ``synkeys`` command."""

import sys

from synkeys.cli import main

if __name__ == "__main__":
    sys.exit(main())
