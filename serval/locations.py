"""Where serval's files live: the bundled default model and the user's cache (torch-free, import-free)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"


class NoDefaultModelError(RuntimeError):
    """No bundled default model is installed (and none was named)."""


def cache_dir() -> Path:
    """serval's cache folder: `$SERVAL_CACHE`, else `$XDG_CACHE_HOME/serval`, else `~/.cache/serval`."""
    if os.environ.get("SERVAL_CACHE"):
        return Path(os.environ["SERVAL_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "serval"
    return Path.home() / ".cache" / "serval"
