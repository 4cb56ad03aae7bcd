"""``python -m monai_vlmfilm.profiles {precompute,stats}``; see :mod:`monai_vlmfilm.profiles.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
