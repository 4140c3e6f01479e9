"""The one fingerprint: a sha256 over a sequence of parts, each text, bytes or a file (its bytes).

Every cache key and model identity is one (eval's prediction cache, a model's `fingerprint`, the ONNX
graph cache, training's encoder cache), as is every checked digest of a file's bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

BLOCK = 1 << 22  # files are read 4 MB at a time


def fingerprint(parts: Iterable[str | bytes | Path]) -> str:
    """The sha256 (hex) of the parts one after the other: text as UTF-8, bytes as they are, a Path by its
    file's bytes (read in blocks), so that a part list gives the digest of its concatenation."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            with open(part, "rb") as f:
                while block := f.read(BLOCK):
                    h.update(block)
        else:
            h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()
