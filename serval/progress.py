"""What a long-running command shows on stderr: the progress bar (tqdm, imported only when shown) and the
one-line notice before a slow step that runs once (the first run's conversions)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

_open = threading.local()  # the notices open in this thread: an inner step is part of the outer one's line


def progress_bar(items: Iterable | None = None, enabled: bool = True, **options):
    """A tqdm bar on stderr over `items`, or one to `update` by hand when there are none.

    Disabled, it returns `items` unchanged (None when there are none), so a loop reads the same
    either way and a manual bar is used as `if bar is not None: bar.update(n)`. `options` go to tqdm.
    """
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, file=sys.stderr, **options)


@contextmanager
def once_notice(message: str) -> Iterator[None]:
    """Say `serval: <message> …` on stderr before a slow one-time step (a conversion into the cache).

    Nested notices stay silent: the first run prints one line, however many conversions it chains.
    """
    depth = getattr(_open, "depth", 0)
    if depth == 0:
        print(f"serval: {message} …", file=sys.stderr, flush=True)
    _open.depth = depth + 1
    try:
        yield
    finally:
        _open.depth = depth
