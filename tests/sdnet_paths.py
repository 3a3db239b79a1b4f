"""Where the real SDNET2018 sample lies: beside the repository, or at `$CRACKJAX_SDNET_DIR`."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_sdnet() -> Path:
    """Return the folder with the sample's `CD/` and `UD/` sub-folders."""
    configured = os.environ.get("CRACKJAX_SDNET_DIR")
    if configured:
        return Path(configured)
    return REPO_ROOT.parent / "shared" / "datasets" / "sdnet2018-decks"


SDNET_DIR = find_sdnet()


def link_labelled(root: Path, images: dict[str, list[Path]], chosen: slice = slice(None)) -> Path:
    """Symlink the `chosen` images of each label into `root/<label>/` and return `root`."""
    for label, paths in images.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for path in paths[chosen]:
            os.symlink(path, root / label / path.name)
    return root
