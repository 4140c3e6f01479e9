"""Records as text: a JSON array, JSON lines, CSV or an aligned table (`serval predict --format`)."""

from __future__ import annotations

import csv
import io
import json


def format_records(records: list[dict], fmt: str) -> str:
    """Records as json (an array), jsonl, csv or an aligned table."""
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records)
    ok = next((r for r in records if "error" not in r), None)
    classes = list(ok["probabilities"]) if ok else []
    dims = list(ok["scores"]) if ok else []
    span = any("start" in r for r in records)
    speech = ["speech_fraction", "no_speech"]
    header = [
        "file",
        *(["start", "end"] if span else []),
        "duration",
        "label",
        *classes,
        *dims,
        *speech,
        "error",
    ]
    rows = []
    for r in records:
        rows.append(
            [
                r.get("file") or "",
                *([_cell(r.get("start")), _cell(r.get("end"))] if span else []),
                r.get("duration", ""),
                r.get("label", ""),  # None (no speech): csv writes an empty cell, the table "-"
                *[r.get("probabilities", {}).get(c, "") for c in classes],
                *[_score_cell(r, d) for d in dims],
                *[_cell(r.get(k)) for k in speech],
                r.get("error", ""),
            ]
        )
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        return buf.getvalue()
    cells = [header] + [[_table_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n" for row in cells)


def _cell(value) -> str | float:
    if isinstance(value, bool):  # as JSON writes it
        return "true" if value else "false"
    return "" if value is None else value


def _score_cell(record: dict, dim: str) -> float | str | None:
    # None: the dimension was not trained (csv writes an empty cell, the table "-"); "": no scores at all
    return record["scores"][dim] if "scores" in record else ""


def _table_cell(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
