"""Moving a finished artifact from its staging directory into OUT (shared by both protocols' writers).

Both halves are written into a staging directory beside OUT first, so an interrupted ``slip protect``
leaves nothing half-written; ``move_into_place`` then makes the secret files owner-only and replaces
OUT/public and OUT/secret by the staged ones.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def move_into_place(public_dir: Path, secret_dir: Path, out_dir: Path) -> None:
    for f in secret_dir.iterdir():
        os.chmod(f, 0o600)
    if out_dir.exists():
        for sub in ("public", "secret"):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    public_dir.rename(out_dir / "public")
    secret_dir.rename(out_dir / "secret")
