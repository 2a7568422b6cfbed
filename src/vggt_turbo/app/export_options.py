"""``reconstruct --export``: which optional formats to write, and the list of files a run leaves in ``--out``.

Why a choice: each format serves a different next tool (a point-cloud viewer, COLMAP and gsplat, nerfstudio) and
each costs time and disk on large scenes. What every run writes regardless (predictions.npz, images/, the COLMAP
text model, preview.png, report.json) is the record of the run, not a format choice.
"""

from __future__ import annotations

from typing import Optional

from .errors import UserError
from .export_nerfstudio import POINTS_FILE

FORMATS = ("ply", "colmap", "nerfstudio")
DEFAULT = ("ply", "colmap")

# Every output in the order a run writes it, with the format that asks for it (None: always written).
_OUTPUTS: tuple[tuple[str, Optional[str]], ...] = (
    ("predictions.npz", None),
    ("points.ply", "ply"),
    ("images/", None),
    ("sparse/cameras.txt", None),
    ("sparse/images.txt", None),
    ("sparse/points3D.txt", None),
    ("sparse/0/cameras.bin", "colmap"),
    ("sparse/0/images.bin", "colmap"),
    ("sparse/0/points3D.bin", "colmap"),
    ("transforms.json", "nerfstudio"),
    (POINTS_FILE, "nerfstudio"),
    ("preview.png", None),
    ("report.json", None),
)


def parse(text: str) -> tuple[str, ...]:
    """``"ply,colmap"`` -> ``("ply", "colmap")`` in FORMATS' order; unknown names or an empty list: UserError."""
    asked = {name.strip().lower() for name in text.split(",") if name.strip()}
    unknown = sorted(asked - set(FORMATS))
    if unknown or not asked:
        what = f"unknown {', '.join(unknown)}" if unknown else "no format named"
        raise UserError(f"--export {text}: {what}; choose from {','.join(FORMATS)} (comma-separated)")
    return tuple(name for name in FORMATS if name in asked)


def outputs(formats: tuple[str, ...]) -> tuple[str, ...]:
    """The files and folders a run with ``formats`` writes, in the order it writes them."""
    return tuple(path for path, needs in _OUTPUTS if needs is None or needs in formats)
