"""Where the project's ``shared/`` folder (DCA1 angiograms, the bundle metadata schema) is, wherever the clone sits.

Looked for, in order: ``$MONAI_VLMFILM_SHARED``; a ``shared`` folder beside the checkout or beside any folder above
it (the project's layout is ``<root>/main`` next to ``<root>/shared``); ``/work/shared``. Tests that need it skip
with the places they looked when none holds it.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_candidates() -> list[Path]:
    out = [Path(os.environ["MONAI_VLMFILM_SHARED"])] if os.environ.get("MONAI_VLMFILM_SHARED") else []
    out += [p / "shared" for p in REPO.parents]
    out.append(Path("/work/shared"))
    return list(dict.fromkeys(out))


def find_shared(relative: str) -> Path:
    """``<shared>/<relative>`` of the first candidate holding it, else the first candidate's path (absent)."""
    cands = shared_candidates()
    for c in cands:
        if (c / relative).exists():
            return c / relative
    return cands[0] / relative


def looked_in(relative: str) -> str:
    return ", ".join(str(c / relative) for c in shared_candidates())


DCA1 = find_shared("data/dca1")
SCHEMA = find_shared("schema/meta_schema_20240725.json")
