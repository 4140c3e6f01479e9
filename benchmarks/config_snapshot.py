"""What every shipped config reads as, with the type of each value: tests/snapshots/configs.json.

    python benchmarks/config_snapshot.py           # compare with the recorded snapshot (exit 1 if it differs)
    python benchmarks/config_snapshot.py --write   # record it again (only after a change meant to alter it)

The snapshot was first written by the hand-written reader that pydantic replaced (main at 39b8b33), so
the comparison shows that each file in configs/ and the bundled model's config.json give the same
dataclass, field for field and type for type.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "snapshots" / "configs.json"  # not tests/golden/: benchmarks/golden.py owns that
DEFAULT_CONFIG = "serval/assets/default/config.json"


def typed(x):
    """A value with its type at every leaf: `[type name, value]`; tuples and lists stay apart."""
    if isinstance(x, dict):
        return {k: typed(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [type(x).__name__, [typed(v) for v in x]]
    return [type(x).__name__, x]


def snapshot() -> dict:
    """Each config in configs/ (a `TrainConfig`) and the bundled model's `SERConfig`, as `typed` values."""
    from serval.model import SERConfig
    from serval.train.config import load_config

    out = {
        f"configs/{f.name}": typed(dataclasses.asdict(load_config(f)))
        for f in sorted((ROOT / "configs").glob("*.yaml"))
    }
    meta = json.loads((ROOT / DEFAULT_CONFIG).read_text())
    known = {f.name for f in dataclasses.fields(SERConfig)}
    out[DEFAULT_CONFIG] = typed(
        dataclasses.asdict(SERConfig.from_dict({k: v for k, v in meta.items() if k in known}))
    )
    return out


def main() -> int:
    now = snapshot()
    if "--write" in sys.argv:
        SNAPSHOT.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"wrote {SNAPSHOT.relative_to(ROOT)}")
        return 0
    recorded = json.loads(SNAPSHOT.read_text())
    differ = sorted(k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k))
    print("\n".join(f"differs: {k}" for k in differ) or "every config reads as recorded")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
