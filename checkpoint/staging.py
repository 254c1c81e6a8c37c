"""All-or-nothing output directories: written in a temporary sibling, renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(out: Path, purpose: str) -> Iterator[Path]:
    """Yield a new, world-readable temporary sibling of ``out`` to write into; when the block
    ends it replaces ``out`` (absent or empty: the caller checks), on any error it is deleted,
    so a reader never sees a half-written model directory and nothing already there is lost."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-{purpose}-"))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a model directory is not
        yield staging
        if out.exists():  # empty (checked by the caller): the rename needs it gone
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
