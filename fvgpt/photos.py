"""Small real photos bundled with the package (see assets/README.md for their source and licences)."""
from __future__ import annotations

from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent / "assets"
PHOTO_NAMES = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg")


def photo_paths() -> list[Path]:
    """The bundled photos, sorted by name."""
    paths = [ASSET_DIR / name for name in PHOTO_NAMES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"bundled photos {', '.join(missing)} are missing from {ASSET_DIR}")
    return paths
