"""`serval pseudolabel`'s files: the resumable progress log, and the outputs written from it at the end
(the manifest, the per-window JSONL and the decisions JSONL, each atomically)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from serval.atomic import atomic_write, atomic_write_text
from serval.clip import Clip
from serval.io.jsonl import JsonlLog
from serval.manifest import ManifestRow, write_manifest
from serval.vocab import EMOTIONS


class Progress:
    """The log that makes a run resumable (`serval.io.jsonl.JsonlLog`): a settings line, then one line per
    finished job. Only the decisions are kept in memory; the per-window labels stay in the log (by byte
    offset) until the final outputs are written.
    """

    def __init__(self, path: Path, settings: dict, restart: bool = False):
        self.path = path
        self.log = JsonlLog(path)
        self.done: dict[str, dict] = {}  # key -> first-pass record, windows replaced by their count
        self.offsets: dict[str, int] = {}  # key -> byte offset of its full record in the log
        self.relabelled: dict[str, dict] = {}
        self.errors: dict[str, str] = {}  # key -> the last error of a job not (yet) done
        if restart or not self._load(settings):
            self.log.start([{"settings": settings}])

    def _load(self, settings: dict) -> bool:
        """Index the log; False when it holds other settings and no finished job (nothing to lose)."""
        records = iter(self.log)
        first = next(records, None)
        saved = first[1].get("settings") if first else None
        if saved != settings:
            if next(records, None) is None:
                return False
            raise ValueError(
                f"{self.path}: this unfinished run used other settings ({saved}); "
                "rerun with the same settings to resume, or pass --restart to start over"
            )
        for offset, rec in records:
            self._index(rec, offset)
        return True

    def _index(self, rec: dict, offset: int) -> None:
        key = rec.get("relabel", rec.get("key"))
        if "error" in rec:
            self.errors[key] = rec["error"]  # failed files are tried again on resume
        elif "relabel" in rec:
            self.relabelled[key] = rec
        else:
            utterances = [{**u, "windows": len(u["windows"])} for u in rec["utterances"]]
            self.done[rec["key"]] = {**rec, "utterances": utterances}
            self.offsets[rec["key"]] = offset

    def add(self, record: dict) -> None:
        """Append a finished job (fsynced before it counts as done)."""
        self._index(record, self.log.append([record])[0])

    def windows(self, key: str) -> list[list[dict]]:
        """The per-window labels of a finished recording, one list per utterance."""
        if key not in self.offsets:
            return [[] for _ in self.done.get(key, {}).get("utterances", [])]
        return [u["windows"] for u in self.log.read_at(self.offsets[key])["utterances"]]


def job_key(src: Clip) -> str:
    """A recording's key in the log: its path and span as text."""
    start, end = ("" if v is None else v for v in (src.start, src.end))
    return f"{src.path}|{start}|{end}"


def output_paths(output: str | os.PathLike) -> dict[str, Path]:
    """The files of a run writing the manifest `output`: the manifest, its windows, decisions and progress log."""
    out = Path(output)
    stem = out.with_suffix("")
    return {
        "manifest": out,
        "windows": Path(f"{stem}.windows.jsonl"),
        "decisions": Path(f"{stem}.decisions.jsonl"),
        "progress": Path(f"{out}.progress.jsonl"),
    }


def write_outputs(sources, state: Progress, paths: dict[str, Path], teachers, relabel, overwrite) -> dict:
    """Write the manifest of kept utterances, the windows and the decisions; remove the log. The counts."""
    rows, decisions = [], []
    failed, utterances = set(), 0
    for src in sources:
        rec = state.done.get(job_key(src))
        if rec is None:
            failed.add(job_key(src))
            reason = "error: " + state.errors.get(job_key(src), "not labelled")
            decisions.append(
                {"path": src.path, "start": src.start, "end": src.end, "kept": False, "reason": reason}
            )
            continue
        if not rec["utterances"]:
            decisions.append(
                {
                    "path": src.path,
                    "start": rec["start"],
                    "end": rec["end"],
                    "kept": False,
                    "reason": rec["reason"],
                }
            )
        second = state.relabelled.get(job_key(src))
        by_span = {(u["start"], u["end"]): u for u in (second or {}).get("utterances", [])}
        for u in rec["utterances"]:
            utterances += 1
            relabelled = by_span.get((u["start"], u["end"]))
            decision = _decision(src, u)
            if u["kept"] and relabel and relabelled is None:
                failed.add(job_key(src))
                reason = "error in the second pass: " + state.errors.get(job_key(src), "not relabelled")
                decision.update(kept=False, reason=reason)
            if decision["kept"]:
                rows.append(_row(src, u, relabelled, teachers, relabel))
                if relabelled:
                    decision["second_pass_label"] = relabelled["label"]
            decisions.append(decision)
    # the manifest last: a run killed while writing leaves no manifest that looks finished
    _write_windows(sources, state, paths["windows"], overwrite)
    atomic_write_text(
        paths["decisions"], "".join(json.dumps(d) + "\n" for d in decisions), overwrite=overwrite
    )
    write_manifest(rows, paths["manifest"], overwrite=overwrite)
    paths["progress"].unlink()
    return {"sources": len(sources), "failed": len(failed), "utterances": utterances, "kept": len(rows)}


def _decision(src, u: dict) -> dict:
    keys = ("kept", "label", "emotional", "windows", "counts", "reason")
    return {"path": src.path, "start": u["start"], "end": u["end"], **{k: u[k] for k in keys}}


def _row(src, u: dict, relabelled: dict | None, teachers, relabel) -> ManifestRow:
    """A kept utterance as a manifest row: the second pass's label and scores if any, else the first's."""
    label = relabelled["label"] if relabelled else u["label"]
    dims = relabelled["scores"] if relabelled else {}
    extra = {k: v for k, v in src.extra.items() if v is not None}
    extra.update(
        {
            "first_pass_label": u["label"],
            "emotional_windows": u["emotional"],
            "windows": u["windows"] or None,
            "teachers": "+".join(teachers) or None,
        }
    )
    if relabelled:
        extra["relabel_model"] = relabel
        extra["relabel_confidence"] = relabelled["confidence"]
    return ManifestRow(
        src.path,
        u["start"],
        u["end"],
        label if label in EMOTIONS else None,
        dims.get("arousal"),
        dims.get("valence"),
        dims.get("dominance"),
        src.language,
        src.speaker,
        src.corpus,
        src.split,
        extra=extra,
    )


def _write_windows(sources, state: Progress, path: Path, overwrite: bool) -> None:
    """Stream every window's labels from the progress log into `path`, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for src in sources:
                rec = state.done.get(job_key(src))
                if rec is None:
                    continue
                for u, windows in zip(rec["utterances"], state.windows(job_key(src))):
                    for w in windows:
                        record = {
                            "path": src.path,
                            "utterance_start": u["start"],
                            "utterance_end": u["end"],
                            **w,
                        }
                        f.write(json.dumps(record) + "\n")

    atomic_write(path, write, overwrite=overwrite)
