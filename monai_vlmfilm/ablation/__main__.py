"""``python -m monai_vlmfilm.ablation``: see :mod:`monai_vlmfilm.ablation.cli`."""

from .cli import main

raise SystemExit(main())
