"""The threaded decoder: items are read in a background thread into a bounded queue while the model runs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np

from serval.audio import AudioError
from serval.clip import Clip
from serval.io.inputs import read_item
from serval.longform import LongAudio


def decoded(items: Iterable[Clip], depth: int) -> Iterator[tuple[Clip, np.ndarray | LongAudio | AudioError]]:
    """(item, wave or its AudioError), decoded in a background thread at most `depth` ahead.

    Audio longer than one 30 s piece is not decoded here: it comes as a LongAudio (see `read_item`)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def work() -> None:
        try:
            for item in items:
                try:
                    result = read_item(item)
                except AudioError as e:
                    result = e
                while not stop.is_set():
                    try:
                        q.put((item, result), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # a bad manifest or dataset: raised in the consumer
            q.put((end, e))
            return
        q.put((end, None))

    thread = threading.Thread(target=work, name="serval-decode", daemon=True)
    thread.start()
    try:
        while True:
            item, result = q.get()
            if item is end:
                if result is not None:
                    raise result
                return
            yield item, result
    finally:
        stop.set()
