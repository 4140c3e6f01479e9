"""The progress bar of every long-running command: tqdm on standard error, imported only when shown."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def progress_bar(items: Iterable | None = None, enabled: bool = True, **options):
    """A tqdm bar on stderr over `items`, or one to `update` by hand when there are none.

    Disabled, it returns `items` unchanged (None when there are none), so a loop reads the same
    either way and a manual bar is used as `if bar is not None: bar.update(n)`. `options` go to tqdm.
    """
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, file=sys.stderr, **options)
