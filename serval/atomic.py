"""Writing files so that a crash never leaves half of one: write a temporary file beside the target, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = True) -> Path:
    """Call `write(tmp)` on a temporary path in the target's folder, then rename it onto `path`.

    With `overwrite=False` an existing `path` raises FileExistsError before anything is written.
    The temporary name keeps `path`'s suffix, so writers that infer a format from it (matplotlib) work.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename, or a power cut could leave an empty file
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; our outputs are as readable as any other file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write `text` (UTF-8) to `path` atomically; an existing file is kept unless `overwrite`."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""), overwrite)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move the finished folder `tmp` onto `final`; an old `final` is renamed aside first, then deleted.

    `final` is always either the old folder or the new one, never a mix or missing for longer
    than between two renames.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final
