"""docs/benchmarks.md's EmoBox table: every `serval benchmark emobox` report under a folder, beside
EmoBox's published mean UAR.

    serval benchmark emobox emodb --folds ../shared/reference/emobox --audio ../shared/data/emodb --init default
    serval benchmark emobox emodb --folds ../shared/reference/emobox --audio ../shared/data/emodb --init none
    python benchmarks/emobox_table.py runs/emobox
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# EmoBox's intra-corpus mean UAR (%), as issue 25 quotes the paper: the range over its base-size SSL
# models (about 95 M parameters), and whisper-large-v3.
PUBLISHED = {
    "emodb": ("82–88", "92.6"),
    "ravdess": ("54–65", "75.3"),
    "casia": ("39–47", "59.6"),
    "emovo": ("31–46", "57.8"),
    "urdu": ("83–88", "n/a"),
}


def rows(root: Path) -> list[str]:
    """One Markdown row per report: corpus, start, folds scored, clips found, UAR/WA/macro-F1, published."""
    out = []
    for path in sorted(root.glob("*/report.json")):
        report = json.loads(path.read_text())
        scored = [f for f in report["folds"] if "uar" in f]
        found = sum(f["found"]["test"] for f in report["folds"])
        total = sum(f["total"]["test"] for f in report["folds"])
        base, large = PUBLISHED.get(report["corpus"], ("n/a", "n/a"))
        figures = " | ".join(f"{100 * report['mean'][m]:.1f}" for m in ("uar", "wa", "macro_f1"))
        start = {"default": "default model", "none": "whisper-base (from scratch)"}.get(
            report["init"], report["init"]
        )
        out.append(
            f"| {report['corpus']} | {start} | {len(scored)} of {len(report['folds'])} | "
            f"{found} of {total} | {figures} | {base} | {large} |"
        )
    return out


def main(root: str = "runs/emobox") -> None:
    print(
        "| corpus | start | folds scored | test clips found | UAR | WA | macro-F1 | EmoBox base SSL UAR | EmoBox whisper-large-v3 UAR |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows(Path(root)):
        print(row)


if __name__ == "__main__":
    main(*sys.argv[1:])
