"""Golden outputs: `serval predict examples/` and `serval eval` on a fixed manifest, within fp32 tolerance.

`python benchmarks/golden.py --write` records them under tests/golden/; without it the script
checks the current code against them and exits 1 on any difference beyond the tolerance.
Refactors must leave them unchanged; a new default model rewrites them (and says so in its commit).
They run on the torch engine (`--engine torch`): the default engine on a CPU, ONNX Runtime, agrees
with it to about 1e-6 (tests/test_onnx_engine.py checks the two agree on the examples).

The comparison is field by field, never byte for byte: fp32 results move in the 6th decimal with the
CPU's vector width, the kernels chosen (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) and the thread count
(OMP_NUM_THREADS), since each changes the order of the sums. Numbers agree to TOL; strings, integers,
nulls and booleans exactly; a label exactly unless its top-two margin is within what TOL lets two
probabilities move (then either of the two is accepted); the eval's per-span probabilities are kept
as a golden file of their own, so that the label-derived metrics of the report are only compared when
no such near tie went the other way. Markdown numbers agree to one unit of their last printed digit.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
DATA = ROOT.parent / "shared" / "data"
# Probabilities and scores: fp32 networks differ across CPUs and thread counts by about 1e-6; 1e-4
# leaves a wide margin yet catches any real change (a changed weight or feature moves them ~1e-2).
TOL = 1e-4
# A fixed, small manifest: two corpora, two languages, several classes, one clip per line.
CLIPS = [
    ("emodb/09a01Wb.flac", "angry", "de", "emodb"),
    ("emodb/09a01Nb.flac", "neutral", "de", "emodb"),
    ("emodb/09a05Tb.flac", "sad", "de", "emodb"),
    ("emodb/09a01Fa.flac", "happy", "de", "emodb"),
    ("ravdess/Actor_16/03-01-01-01-01-01-16.flac", "neutral", "en", "ravdess"),
    ("ravdess/Actor_16/03-01-03-01-01-01-16.flac", "happy", "en", "ravdess"),
    ("ravdess/Actor_16/03-01-04-01-01-01-16.flac", "sad", "en", "ravdess"),
    ("ravdess/Actor_16/03-01-05-01-01-01-16.flac", "angry", "en", "ravdess"),
    ("ravdess/Actor_16/03-01-06-01-01-01-16.flac", "fearful", "en", "ravdess"),
    ("ravdess/Actor_16/03-01-07-01-01-01-16.flac", "disgusted", "en", "ravdess"),
    ("ravdess/Actor_16/03-01-08-01-01-01-16.flac", "surprised", "en", "ravdess"),
]
PREDICT, SPANS, REPORT_JSON, REPORT_MD = (
    "predict-examples.json",
    "eval-predictions.json",
    "eval-report.json",
    "eval-report.md",
)


# ----------------------------------------------------------------------------- producing the outputs


def serval(*args: str) -> str:
    """Run the `serval` command of this interpreter's environment; its stdout."""
    cmd = [sys.executable, "-m", "serval", *args]
    return subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout


def span_predictions(cache: Path) -> str:
    """The eval's prediction cache as golden text: one record per span, by file and time."""
    records = []
    for file in sorted(cache.glob("*.jsonl")):
        for line in file.read_text().splitlines():
            r = json.loads(line)
            records.append(
                {
                    "file": str(Path(r["file"]).relative_to(DATA)),
                    "start": r["start"],
                    "end": r["end"],
                    "probabilities": dict(zip(r["classes"], r["probs"])),
                    "scores": dict(zip(r["dimensions"], r["scores"])),
                }
            )
    records.sort(key=lambda r: (r["file"], r["start"] or 0.0, r["end"] or 0.0))
    return json.dumps(records, indent=2) + "\n"


def outputs() -> dict[str, str]:
    """{golden file name: text} as the current code produces them."""
    out = {PREDICT: serval("predict", "examples/", "--format", "json", "--engine", "torch")}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "golden.csv"
        lines = ["path,label,language,corpus,speaker,split"]
        lines += [
            f"{DATA / p},{lab},{lang},{corpus},{p.split('/')[-1][:2]},test" for p, lab, lang, corpus in CLIPS
        ]
        manifest.write_text("\n".join(lines) + "\n")
        serval(
            *("eval", str(manifest), "--model", "serval/assets/default", "-o", f"{tmp}/report"),
            *("--cache-dir", f"{tmp}/cache", "--bootstrap", "50", "--no-progress", "--engine", "torch"),
        )
        out[SPANS] = span_predictions(Path(tmp) / "cache")
        for name in ("report.json", "report.md"):
            text = (Path(tmp) / "report" / name).read_text().replace(str(DATA), "DATA").replace(tmp, "TMP")
            text = re.sub(r'"created": "[^"]*"', '"created": "-"', text)
            # the cache key hashes file times and absolute paths: never the same in two checkouts
            out[f"eval-{name}"] = re.sub(r'"fingerprint": "[^"]*"', '"fingerprint": "-"', text)
    return out


# ----------------------------------------------------------------------------- comparing within tolerance


def compare_values(want, got, where: str, tol: float = TOL) -> list[str]:
    """Differences between two JSON values: floats beyond `tol`, anything else not equal, as messages."""
    if isinstance(want, dict) and isinstance(got, dict):
        if set(want) != set(got):
            return [f"{where}: keys {sorted(got)}, golden {sorted(want)}"]
        return [p for k in want for p in compare_values(want[k], got[k], f"{where}.{k}", tol)]
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{where}: {len(got)} items, golden {len(want)}"]
        return [
            p for i, (w, g) in enumerate(zip(want, got)) for p in compare_values(w, g, f"{where}[{i}]", tol)
        ]
    if isinstance(want, float) or isinstance(got, float):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (want, got))
        if numbers and abs(got - want) <= tol:
            return []
        return [f"{where}: {got!r}, golden {want!r} (tolerance {tol:g})"]
    return [] if want == got and type(want) is type(got) else [f"{where}: {got!r}, golden {want!r}"]


def top_two_margin(probs: dict[str, float], classes: Sequence[str]) -> tuple[str, str | None, float]:
    """The best and second-best of `classes` by probability and the margin between them."""
    ranked = sorted(classes, key=lambda c: -probs[c])
    if len(ranked) < 2:
        return ranked[0], None, float("inf")
    return ranked[0], ranked[1], probs[ranked[0]] - probs[ranked[1]]


def compare_label(
    want_probs: dict, got_label: str | None, classes: Sequence[str], where: str, tol: float = TOL
) -> tuple[list[str], bool]:
    """(problems, near tie flipped): `got_label` against the golden argmax over `classes`.

    With every probability within `tol` of the golden one, the order of the top two can only change
    when their golden margin is at most 2 * tol; then either of the two is accepted.
    """
    best, second, margin = top_two_margin(want_probs, classes)
    if got_label == best:
        return [], False
    if margin <= 2 * tol and got_label == second:
        return [], True
    return [f"{where}: label {got_label!r}, golden {best!r} (top-two margin {margin:.2g})"], False


def record_labels(w: dict, g: dict, where: str, subsets: Sequence[Sequence[str]]) -> tuple[list[str], int]:
    """(problems, near ties flipped) of one record's labels: its own "label" over its classes, or, for
    a record without one (an eval span), the argmax over every class subset the eval takes one over."""
    probs = w["probabilities"]
    if "label" in w and w["label"] is None:  # no label given: none must be given now either
        return ([] if g.get("label") is None else [f"{where}: label {g.get('label')!r}, golden None"]), 0
    problems, flipped = [], 0
    for classes in [list(probs)] if "label" in w else subsets:
        classes = [c for c in classes if c in probs]
        got = g["label"] if "label" in w else top_two_margin(g["probabilities"], classes)[0]
        bad, tie = compare_label(probs, got, classes, f"{where} over {len(classes)} classes")
        problems, flipped = problems + bad, flipped + tie
    return problems, flipped


def compare_records(
    want: list, got: list, name: str, subsets: Sequence[Sequence[str]]
) -> tuple[list[str], int]:
    """(problems, near ties flipped) between two lists of prediction records."""
    if len(want) != len(got):
        return [f"{name}: {len(got)} records, golden {len(want)}"], 0
    problems, flipped = [], 0
    for i, (w, g) in enumerate(zip(want, got)):
        where = f"{name}[{i}] {w.get('file', '')}"
        values = compare_values(*({k: v for k, v in r.items() if k != "label"} for r in (w, g)), where)
        problems += values
        if not values and isinstance(w.get("probabilities"), dict):
            bad, tie = record_labels(w, g, where, subsets)
            problems, flipped = problems + bad, flipped + tie
    return problems, flipped


NUMBER = re.compile(r"\d+(?:\.\d+)?")


def compare_markdown(want: str, got: str, name: str) -> list[str]:
    """Text equal outside numbers, integers equal, and a number with decimals within one unit of its
    last printed digit (a value on a rounding boundary may print either way)."""
    want_lines, got_lines = want.splitlines(), got.splitlines()
    if len(want_lines) != len(got_lines):
        return [f"{name}: {len(got_lines)} lines, golden {len(want_lines)}"]
    problems = []
    for i, (w, g) in enumerate(zip(want_lines, got_lines)):
        w_nums, g_nums = NUMBER.findall(w), NUMBER.findall(g)
        close = NUMBER.split(w) == NUMBER.split(g) and all(map(printed_close, w_nums, g_nums))
        if not close:
            problems.append(f"{name} line {i + 1}: {g!r}, golden {w!r}")
    return problems


def printed_close(want: str, got: str) -> bool:
    """Two printed numbers: the same digits after the point, and within one unit of the last one."""
    decimals = len(want.partition(".")[2])
    if decimals != len(got.partition(".")[2]):
        return False
    return want == got if decimals == 0 else abs(float(want) - float(got)) <= 1.5 * 10.0**-decimals


def eval_subsets(report: dict) -> list[list[str]]:
    """Every class set the eval of `report` takes an argmax over: each protocol's classes, alone and
    restricted to each corpus's own labels (a superset of those it used, which only adds true checks)."""
    from serval.evaluate import PROTOCOLS

    subsets = []
    for protocol in report["settings"]["protocols"]:
        classes = list(PROTOCOLS[protocol])
        subsets.append(classes)
        subsets += [[c for c in classes if c in labels] for labels in report["corpus_labels"].values()]
    distinct: dict[frozenset, list[str]] = {}
    for classes in subsets:
        if classes:
            distinct.setdefault(frozenset(classes), classes)
    return list(distinct.values())


def compare(golden: dict[str, str], current: dict[str, str]) -> tuple[list[str], list[str]]:
    """(problems, notes) between the golden outputs and the current ones."""
    missing = sorted(set(golden) ^ set(current))
    if missing:
        return [f"golden files and outputs differ in {', '.join(missing)}"], []
    problems, _ = compare_records(json.loads(golden[PREDICT]), json.loads(current[PREDICT]), PREDICT, [])
    report = json.loads(golden[REPORT_JSON])
    spans, flipped = compare_records(
        json.loads(golden[SPANS]), json.loads(current[SPANS]), SPANS, eval_subsets(report)
    )
    problems += spans
    if flipped:  # the report's counts and metrics come from those labels: compared through them above
        return problems, [f"{flipped} near-tie span label(s) went the other way: eval report not compared"]
    problems += compare_values(report, json.loads(current[REPORT_JSON]), REPORT_JSON)
    problems += compare_markdown(golden[REPORT_MD], current[REPORT_MD], REPORT_MD)
    return problems, []


def near_ties(texts: dict[str, str]) -> list[str]:
    """Golden spans and records whose top-two margin is within 2 * TOL, to say so when recording."""
    found = []
    for name in (PREDICT, SPANS):
        for r in json.loads(texts[name]):
            margin = top_two_margin(r["probabilities"], list(r["probabilities"]))[2]
            if margin <= 2 * TOL:
                found.append(f"{name} {r['file']} {r.get('start')}-{r.get('end')}: margin {margin:.2g}")
    return found


def largest_difference(golden: dict[str, str], current: dict[str, str]) -> float:
    """The largest probability or score difference over the prediction records, to report the margin."""
    diffs = [0.0]
    for name in (PREDICT, SPANS):
        for w, g in zip(json.loads(golden[name]), json.loads(current[name])):
            for field in ("probabilities", "scores"):
                pairs = [(v, (g.get(field) or {}).get(k)) for k, v in (w.get(field) or {}).items()]
                diffs += [abs(a - b) for a, b in pairs if isinstance(a, float) and isinstance(b, float)]
    return max(diffs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="record the current outputs as the golden ones")
    args = ap.parse_args()
    current = outputs()
    if args.write:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name, text in current.items():
            (GOLDEN / name).write_text(text)
        print(f"wrote {len(current)} golden files to {GOLDEN}")
        for tie in near_ties(current):
            print(f"near tie (either label accepted): {tie}")
        return 0
    golden = {f.name: f.read_text() for f in sorted(GOLDEN.iterdir()) if f.suffix in (".json", ".md")}
    problems, notes = compare(golden, current)
    for line in [*notes, *problems[:40]]:
        print(line)
    print(f"largest probability or score difference: {largest_difference(golden, current):.2g}")
    print(
        f"all golden outputs agree within {TOL:g}" if not problems else f"{len(problems)} golden differences"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
