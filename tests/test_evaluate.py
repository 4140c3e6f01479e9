"""`serval eval`: segmentations, protocols, exclusion of bad clips, caching and the side-by-side report."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, RAVDESS_CODES, clips

from serval import cli
from serval.audio import load_audio
from serval.checkpoint import save_model
from serval.eval_segments import make_units
from serval.evaluate import evaluate, labels_problem
from serval.inference import load
from serval.manifest import ManifestRow, read_manifest, write_manifest
from serval.metrics import classification_scores
from serval.model import EMOTIONS, SERConfig, SERModel
from serval.report import pct
from serval.vocab import DIMENSIONS

EMODB_CODES = {"W": "angry", "E": "disgusted", "A": "fearful", "F": "happy", "T": "sad", "N": "neutral"}
NOISE = DATA / "noise" / "speech-commands"


def ravdess(name: str) -> Path:
    path = DATA / "ravdess" / "Actor_01" / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def onehot(label: str, p: float = 1.0) -> np.ndarray:
    out = np.full(len(EMOTIONS), (1 - p) / (len(EMOTIONS) - 1) if p < 1 else 0.0, np.float32)
    out[EMOTIONS.index(label)] = p
    return out


def wave_key(wave: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(wave, np.float32).tobytes()).hexdigest()


class Scripted:
    """A stand-in system whose answer is a function of the waveform; it counts what it is asked."""

    classes = EMOTIONS
    dimensions = ("arousal", "valence", "dominance")

    def __init__(self, answer, name="scripted", fingerprint="0" * 40):
        self.answer, self.name, self.fingerprint = answer, name, fingerprint
        self.asked = 0

    def predict_waveforms(self, waves, batch_size=16):
        self.asked += len(waves)
        probs = np.stack([self.answer(w) for w in waves]).astype(np.float32)
        return probs, np.full((len(waves), 3), np.nan, np.float32)


def by_length(wave: np.ndarray) -> np.ndarray:
    # >= 3 s -> sad, shorter -> angry: makes the segmentation visible in the scores
    return onehot("sad" if len(wave) >= 3 * 16000 else "angry", 0.9)


# ----------------------------------------------------------------------------- segments


def test_segmentations_by_hand():
    a = ravdess("03-01-04-01-01-01-01.flac")  # 3.84 s
    b = ravdess("03-01-05-01-01-01-01.flac")  # 3.87 s
    dishes, bike = NOISE / "doing_the_dishes.flac", NOISE / "exercise_bike.flac"
    rows = [
        ManifestRow(str(a), 0.0, 2.0, "sad"),
        ManifestRow(str(a), 2.0, 3.2, "sad"),
        ManifestRow(str(b), 0.0, 1.5, "angry"),
        ManifestRow(str(b), 1.5, 3.0, "neutral"),
        *[ManifestRow(str(dishes), 2.0 * k, 2.0 * k + 2, "neutral") for k in range(10)],
        ManifestRow(str(bike), 0.0, 9.0, "happy"),
        ManifestRow(str(bike), 20.0, 28.5, "happy"),
    ]
    spans = {
        seg: [(Path(u.path).name, u.start, u.end, u.label) for u in make_units(rows, seg)]
        for seg in ("utterance", "2s", "merged")
    }
    assert len(spans["utterance"]) == len(rows)
    # merged: same label + touching spans, up to 15 s; a 16 s run is cut after 14 s
    assert spans["merged"] == [
        (a.name, 0.0, 3.2, "sad"),
        (b.name, 0.0, 1.5, "angry"),
        (b.name, 1.5, 3.0, "neutral"),
        (dishes.name, 0.0, 14.0, "neutral"),
        (dishes.name, 14.0, 20.0, "neutral"),
        (bike.name, 0.0, 9.0, "happy"),
        (bike.name, 20.0, 28.5, "happy"),  # not touching the previous row: not merged
    ]
    two = spans["2s"]
    # rows of <= 2 s stay as they are; 9 s -> 4 x 2 s + a 1 s tail; 8.5 s -> 4 x 2 s, the 0.5 s tail dropped
    assert [s for s in two if s[0] == bike.name] == [
        (bike.name, 0.0, 2.0, "happy"),
        (bike.name, 2.0, 4.0, "happy"),
        (bike.name, 4.0, 6.0, "happy"),
        (bike.name, 6.0, 8.0, "happy"),
        (bike.name, 8.0, 9.0, "happy"),
        (bike.name, 20.0, 22.0, "happy"),
        (bike.name, 22.0, 24.0, "happy"),
        (bike.name, 24.0, 26.0, "happy"),
        (bike.name, 26.0, 28.0, "happy"),
    ]
    assert len(two) == 2 + 2 + 10 + 9
    # a whole-file row is cut at its real duration
    whole = make_units([ManifestRow(str(a), label="sad")], "2s")
    assert [(u.start, u.end) for u in whole] == [(0.0, 2.0), (2.0, 3.837188)]


def test_segment_protocol_scores_known_answer(tmp_path):
    a = ravdess("03-01-04-01-01-01-01.flac")
    b = ravdess("03-01-05-01-01-01-01.flac")
    dishes, bike = NOISE / "doing_the_dishes.flac", NOISE / "exercise_bike.flac"
    rows = [
        ManifestRow(str(a), 0.0, 2.0, "sad"),
        ManifestRow(str(a), 2.0, 3.2, "sad"),
        ManifestRow(str(b), 0.0, 1.5, "angry"),
        ManifestRow(str(b), 1.5, 3.0, "neutral"),
        *[ManifestRow(str(dishes), 2.0 * k, 2.0 * k + 2, "neutral") for k in range(10)],
        ManifestRow(str(bike), 0.0, 9.0, "happy"),
    ]
    report = evaluate(rows, [Scripted(by_length)], tmp_path / "cache", protocols=["7class"], bootstrap=0)
    res = {
        seg: report["results"][seg]["7class"]["scripted"]["overall"] for seg in ("utterance", "2s", "merged")
    }
    assert report["n_items"] == {"utterance": 15, "2s": 19, "merged": 6}
    # merged: a [0, 3.2] sad -> sad ok; b angry ok; b neutral wrong; dishes [0,14], [14,20] -> sad, wrong;
    # bike 9 s -> sad, wrong. recalls sad 1, angry 1, neutral 0, happy 0
    assert res["merged"]["uar"] == pytest.approx(0.5)
    assert res["merged"]["n"] == 6
    # 2 s: everything is short -> angry: only the angry row is right
    assert res["2s"]["uar"] == pytest.approx(0.25)
    assert res["2s"]["confusion"][EMOTIONS.index("happy")][EMOTIONS.index("angry")] == 5
    # utterance: rows as they are; the 9 s row is long -> sad, still wrong for happy
    assert res["utterance"]["uar"] == pytest.approx(0.25)
    assert res["utterance"]["confusion"][EMOTIONS.index("happy")][EMOTIONS.index("sad")] == 1


# ----------------------------------------------------------------------------- protocols


@pytest.fixture(scope="module")
def four_clips():
    """Real RAVDESS clips (gold from the file name) and scripted answers for each."""
    names = {
        "03-01-05-01-01-01-01.flac": ("angry", {"fearful": 0.5, "angry": 0.3, "neutral": 0.2}),
        "03-01-06-01-01-01-01.flac": ("fearful", {"fearful": 0.6, "sad": 0.4}),
        "03-01-01-01-01-01-01.flac": ("neutral", {"neutral": 0.6, "happy": 0.4}),
        "03-01-04-01-01-01-01.flac": ("sad", {"surprised": 0.45, "happy": 0.4, "sad": 0.15}),
    }
    table, rows = {}, []
    for name, (label, probs) in names.items():
        path = ravdess(name)
        assert RAVDESS_CODES[name.split("-")[2]] == label
        p = np.zeros(len(EMOTIONS), np.float32)
        for k, v in probs.items():
            p[EMOTIONS.index(k)] = v
        table[wave_key(load_audio(path))] = p
        rows.append(ManifestRow(str(path), label=label, language="en", corpus="ravdess"))
    # a span other than the whole clip (2 s segments) gets a fixed answer
    return rows, (lambda w: table.get(wave_key(w), onehot("neutral", 0.5)))


def test_four_class_protocol_known_answer(tmp_path, four_clips):
    rows, answer = four_clips
    report = evaluate(
        rows,
        [Scripted(answer)],
        tmp_path / "cache",
        segmentations=["utterance"],
        corpus_classes="all",
        bootstrap=0,
    )
    seven = report["results"]["utterance"]["7class"]["scripted"]["overall"]
    four = report["results"]["utterance"]["4class"]["scripted"]["overall"]
    # 7 classes: angry -> fearful (x), fearful ok, neutral ok, sad -> surprised (x): UAR 2/4
    assert seven["n"] == 4 and seven["uar"] == pytest.approx(0.5)
    # 4 classes: the fearful clip leaves; angry -> argmax(neutral .2, angry .3, sad 0, happy 0) = angry (ok);
    # neutral ok; sad -> argmax over the 4 = happy (x): UAR (1 + 1 + 0) / 3
    assert four["n"] == 3
    assert four["classes"] == ["neutral", "angry", "sad", "happy"]
    assert four["uar"] == pytest.approx(2 / 3)
    assert four["confusion"] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert report["results"]["utterance"]["4class"]["scripted"]["by_language"]["en"]["uar"] == pytest.approx(
        2 / 3
    )


def test_corpus_scored_over_its_own_classes(tmp_path, four_clips):
    rows, answer = four_clips
    # the corpus has angry, fearful, neutral, sad: "surprised" and "happy" cannot be answered for it
    report = evaluate(
        rows,
        [Scripted(answer)],
        tmp_path / "cache",
        segmentations=["utterance"],
        protocols=["7class"],
        corpus_classes="own",
        bootstrap=0,
    )
    assert report["corpus_labels"] == {"ravdess": ["neutral", "sad", "angry", "fearful"]}
    seven = report["results"]["utterance"]["7class"]["scripted"]["overall"]
    # angry -> fearful (x), fearful ok, neutral ok, sad -> argmax(sad .15 among own classes) = sad (ok)
    assert seven["uar"] == pytest.approx(0.75)


def test_hard_label_outside_the_protocol_counts_as_wrong(tmp_path, four_clips):
    rows, _ = four_clips
    llm_like = Scripted(lambda w: onehot("fearful"))  # a one-label system answering fearful to everything
    report = evaluate(
        rows, [llm_like], tmp_path / "cache", segmentations=["utterance"], protocols=["4class"], bootstrap=0
    )
    four = report["results"]["utterance"]["4class"]["scripted"]["overall"]
    assert four["n"] == 3 and four["uar"] == 0.0 and four["no_answer"] == 3


# ----------------------------------------------------------------------------- failures, cache, breakdowns


def broken_files(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    corrupt = directory / "corrupt.flac"
    corrupt.write_bytes(b"fLaC" + bytes(range(256)) * 8)
    empty = directory / "empty.wav"
    empty.write_bytes(b"")
    return [corrupt, empty, directory / "missing.flac"]


def test_bad_clips_are_excluded_for_every_model(tmp_path, four_clips):
    rows, answer = four_clips
    bad = broken_files(tmp_path / "audio")
    rows = rows + [ManifestRow(str(p), label="sad", language="en", corpus="ravdess") for p in bad]
    first, second = Scripted(answer, "first", "1" * 40), Scripted(by_length, "second", "2" * 40)
    report = evaluate(
        rows,
        [first, second],
        tmp_path / "cache",
        segmentations=["utterance", "2s"],
        protocols=["7class"],
        bootstrap=0,
    )
    excluded = {Path(e["file"]).name: e["error"] for e in report["excluded"]}
    assert set(excluded) == {"corrupt.flac", "empty.wav", "missing.flac"}
    assert all(str(tmp_path) in e for e in excluded.values())  # the message names the file
    assert report["n_rows_excluded"] == 3
    for seg in ("utterance", "2s"):
        ns = {m: report["results"][seg]["7class"][m]["overall"]["n"] for m in ("first", "second")}
        assert ns["first"] == ns["second"]
    assert report["results"]["utterance"]["7class"]["first"]["overall"]["n"] == 4
    assert first.asked == second.asked  # both saw exactly the clips that decoded


def test_rows_without_label_or_dims_are_not_run(tmp_path, four_clips):
    rows, answer = four_clips
    unlabelled = ManifestRow(str(ravdess("03-01-07-01-01-01-01.flac")), language="en", corpus="ravdess")
    rated = ManifestRow(str(ravdess("03-01-08-01-01-01-01.flac")), arousal=0.8, corpus="ravdess")
    system = Scripted(answer)
    report = evaluate(
        rows + [unlabelled, rated], [system], tmp_path / "cache", segmentations=["utterance"], bootstrap=0
    )
    assert system.asked == 5  # the 4 labelled clips and the one with an arousal rating
    assert report["n_items"] == {"utterance": 5}
    assert report["results"]["utterance"]["7class"]["scripted"]["overall"]["n"] == 4


def test_cache_rescores_only_what_changed(tmp_path, four_clips):
    rows, answer = four_clips
    clip_dir = tmp_path / "clips"
    clip_dir.mkdir()
    copies = []
    for r in rows:  # private copies so that one can be touched
        dst = clip_dir / Path(r.path).name
        dst.write_bytes(Path(r.path).read_bytes())
        copies.append(ManifestRow(str(dst), label=r.label, language=r.language, corpus=r.corpus))
    system = Scripted(answer)
    first = evaluate(copies, [system], tmp_path / "cache", segmentations=["utterance"], bootstrap=0)
    assert system.asked == 4
    again = Scripted(answer)
    second = evaluate(copies, [again], tmp_path / "cache", segmentations=["utterance"], bootstrap=0)
    assert again.asked == 0
    assert second["results"] == first["results"]
    st = os.stat(copies[0].path)
    os.utime(copies[0].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = Scripted(answer)
    evaluate(copies, [third], tmp_path / "cache", segmentations=["utterance"], bootstrap=0)
    assert third.asked == 1
    # another model (fingerprint) has its own cache entries
    other = Scripted(answer, fingerprint="f" * 40)
    evaluate(copies, [other], tmp_path / "cache", segmentations=["utterance"], bootstrap=0)
    assert other.asked == 4


def test_breakdowns_per_language_and_corpus(tmp_path, emodb_clips, four_clips):
    rows, answer = four_clips
    emodb = [
        ManifestRow(str(p), label=EMODB_CODES[p.stem[5]], language="de", corpus="emodb")
        for p in emodb_clips
        if p.stem[5] in EMODB_CODES
    ]
    keys = {wave_key(load_audio(r.path)) for r in rows}
    system = Scripted(lambda w: answer(w) if wave_key(w) in keys else onehot("angry", 0.5))
    report = evaluate(
        rows + emodb,
        [system],
        tmp_path / "cache",
        segmentations=["utterance"],
        protocols=["7class"],
        bootstrap=100,
    )
    entry = report["results"]["utterance"]["7class"]["scripted"]
    assert set(entry["by_language"]) == {"en", "de"} and set(entry["by_corpus"]) == {"ravdess", "emodb"}
    assert entry["by_corpus"]["ravdess"]["n"] == 4 and entry["by_corpus"]["emodb"]["n"] == len(emodb)
    gold = [r.label for r in emodb]
    expected = classification_scores(gold, ["angry"] * len(gold), EMOTIONS)
    assert entry["by_language"]["de"]["uar"] == pytest.approx(expected["uar"])
    lo, hi = entry["overall"]["uar_ci95"]
    assert lo <= entry["overall"]["uar"] <= hi


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = []
    for seed, name in ((0, "model_a"), (1, "model_b")):
        torch.manual_seed(seed)
        # model_a marks its dimensions trained, model_b (a model that never trained them) does not
        trained = ("arousal", "valence", "dominance") if name == "model_a" else ()
        dirs.append(save_model(SERModel(SERConfig.tiny(name=name, trained_dimensions=trained)), root / name))
    return dirs


def md_table(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the table right below `heading` (a whole heading line), header row first."""
    after = markdown.split(f"\n{heading}\n", 1)[1].lstrip("\n")
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in after.split("\n\n")[0].splitlines()
    ]
    return [cells for cells in rows if set(cells) != {"---"}]


def summary_rows(markdown: str) -> dict:
    return {tuple(cells[:3]): cells[3:] for cells in md_table(markdown, "## Summary")[1:]}


@pytest.mark.slow
def test_eval_command_two_models(tmp_path, two_models, ravdess_clips, ased_clips):
    rows = [
        ManifestRow(
            str(p),
            label=RAVDESS_CODES[p.stem.split("-")[2]],
            language="en",
            corpus="ravdess",
            arousal=0.2 + 0.1 * i,
            valence=0.5,
        )
        for i, p in enumerate(ravdess_clips[:5])
        if p.stem.split("-")[2] in RAVDESS_CODES
    ]
    ased = {"n": "neutral", "f": "fearful", "h": "happy", "s": "sad", "a": "angry"}
    rows += [
        ManifestRow(str(p), label=ased[p.name[0].lower()], language="am", corpus="ased")
        for p in ased_clips[:3]
    ]
    bad = broken_files(tmp_path / "bad")[0]
    rows.append(ManifestRow(str(bad), label="angry", language="en", corpus="ravdess"))
    manifest = tmp_path / "test.csv"
    write_manifest(rows, manifest)
    assert len(read_manifest(manifest)) == len(rows)
    out = tmp_path / "report"
    argv = [
        "eval",
        str(manifest),
        "--model",
        str(two_models[0]),
        "--model",
        str(two_models[1]),
        "-o",
        str(out),
        "--bootstrap",
        "200",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert cli.main(argv) == 0

    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    names = [m["name"] for m in report["models"]]
    assert names == ["model_a", "model_b"]
    assert [Path(e["file"]).name for e in report["excluded"]] == ["corrupt.flac"]
    assert "corrupt.flac" in markdown
    # whole files: the merged segments are the utterances, so that view is shown once, not repeated
    assert report["same_segments"] == {"merged": "utterance"}
    assert "merged = utterance: no two rows of one file touch" in markdown
    pngs = sorted(p.name for p in (out / "confusion").glob("*.png"))
    assert len(pngs) == 2 * 2 * 2 and not [p for p in pngs if "__merged__" in p]
    assert all((out / "confusion" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    table = summary_rows(markdown)
    assert len(table) == 2 * 2 * 2
    for seg, by_proto in report["results"].items():
        for proto, by_model in by_proto.items():
            for name in names:
                o = by_model[name]["overall"]
                shown = {"utterance": "utterance = merged", "merged": "utterance = merged"}.get(seg, seg)
                n, uar, ci, acc, f1, no_answer = table[(name, shown, proto)]
                assert int(n) == o["n"]
                assert uar == pct(o["uar"]) and acc == pct(o["accuracy"]) and f1 == pct(o["macro_f1"])
                assert ci == f"{pct(o['uar_ci95'][0])}–{pct(o['uar_ci95'][1])}"
                assert int(no_answer) == o["no_answer"] == 0
            # both models scored on the same items
            assert by_model["model_a"]["overall"]["n"] == by_model["model_b"]["overall"]["n"]
    assert report["results"]["utterance"]["7class"]["model_a"]["overall"]["n"] == len(rows) - 1
    assert set(report["dimensional"]["utterance"]) == {"model_a"}  # untrained outputs are not scored
    assert report["dimensional"]["utterance"]["model_a"]["arousal"]["n"] == 5

    # the report is never overwritten without --overwrite; the cache makes the re-run free
    before = (out / "report.json").read_text()
    assert cli.main(argv) == 2
    assert (out / "report.json").read_text() == before
    caches = sorted((out / "cache").glob("*.jsonl"))
    assert len(caches) == 2
    sizes = [c.stat().st_size for c in caches]
    assert cli.main([*argv, "--overwrite"]) == 0
    assert [c.stat().st_size for c in caches] == sizes
    again = json.loads((out / "report.json").read_text())
    assert again["results"] == report["results"]


def test_eval_command_bad_arguments(tmp_path, two_models, capsys):
    manifest = tmp_path / "m.csv"
    write_manifest([ManifestRow(str(ravdess("03-01-04-01-01-01-01.flac")), label="sad")], manifest)
    out = tmp_path / "out"
    assert cli.main(["eval", str(manifest), "--model", str(tmp_path / "nope"), "-o", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    assert (
        cli.main(["eval", str(manifest), "--model", str(two_models[0]), "-o", str(out), "--segments", "3s"])
        == 2
    )
    assert "3s" in capsys.readouterr().err
    assert cli.main(["eval", str(manifest), "--model", "emotion2vec:large", "-o", str(out)]) == 2
    assert "pip install serval[funasr]" in capsys.readouterr().err
    assert not out.exists()


def test_in_memory_predictor_is_keyed_by_its_weights(tmp_path, four_clips):
    from serval.eval_predictions import system_fingerprint as fingerprint
    from serval.inference import Predictor

    rows, _ = four_clips
    torch.manual_seed(0)
    a = Predictor(SERModel(SERConfig.tiny()), "cpu")
    torch.manual_seed(0)
    same = Predictor(SERModel(SERConfig.tiny()), "cpu")
    torch.manual_seed(1)
    other = Predictor(SERModel(SERConfig.tiny()), "cpu")
    assert fingerprint(a) == fingerprint(same) != fingerprint(other)
    first = evaluate(rows[:2], [a], tmp_path / "cache", segmentations=["utterance"], bootstrap=0)
    assert len(list((tmp_path / "cache").glob("tiny-*.jsonl"))) == 1
    calls = []
    same.predict_waveforms = lambda waves, batch_size=16: calls.append(len(waves))
    again = evaluate(rows[:2], [same], tmp_path / "cache", segmentations=["utterance"], bootstrap=0)
    assert calls == [] and again["results"] == first["results"]


@pytest.mark.slow
def test_eval_does_not_score_untrained_outputs(trained_dims_models, tmp_path):
    from serval.eval_predictions import predict_all
    from serval.eval_segments import make_units
    from serval.evaluate import score_dimensions

    gold = [(0.2, 0.7, 0.4), (0.4, 0.5, 0.5), (0.6, 0.3, 0.7), (0.8, 0.6, 0.6)]
    rows = [ManifestRow(str(p), None, None, "sad", *g) for p, g in zip(clips("ravdess", n=4), gold)]
    units = make_units(rows, "utterance")
    systems = [load(trained_dims_models[trained], device="cpu") for trained in [(), ("arousal",), DIMENSIONS]]
    names = ["none", "arousal", "all"]
    tables, failures = predict_all(units, systems, names, tmp_path / "cache")
    assert not failures
    dims = score_dimensions(units, names, tables)
    assert "none" not in dims  # nothing trained: no CCC row at all
    assert dims["arousal"]["arousal"]["n"] == len(rows) and dims["arousal"]["valence"]["n"] == 0
    assert math.isnan(dims["arousal"]["valence"]["ccc"])
    assert dims["all"]["valence"]["n"] == len(rows)  # the same weights, trained: scored
    assert dims["all"]["arousal"]["ccc"] == dims["arousal"]["arousal"]["ccc"]


# ----------------------------------------------------------------------------- the report's layout


def test_report_shows_each_view_once_with_recall_confusion_and_one_table_per_breakdown(
    tmp_path, emodb_clips, four_clips
):
    from serval.report import distinct_views, markdown_report

    rows, answer = four_clips
    emodb = [
        ManifestRow(str(p), label=EMODB_CODES[p.stem[5]], language="de", corpus="emodb")
        for p in emodb_clips
        if p.stem[5] in EMODB_CODES
    ]
    first, second = Scripted(answer, "first", "1" * 40), Scripted(by_length, "second", "2" * 40)
    report = evaluate(rows + emodb, [first, second], tmp_path / "cache", bootstrap=20)
    # whole files: merged = utterance (same items, same scores), kept in report.json, shown once
    assert report["same_segments"] == {"merged": "utterance"}
    assert report["results"]["merged"] == report["results"]["utterance"]
    views = distinct_views(report)
    assert [v[:2] for v in views] == [("utterance = merged", "utterance")] * 2 + [("2s", "2s")] * 2
    md = markdown_report(report)
    assert len(summary_rows(md)) == len(views) * 2
    # per-class recall: one table per protocol, a column per class of it, the numbers of report.json
    recall = md_table(md, "### 7class")
    assert recall[0] == ["model", "segments", *EMOTIONS, "UAR"]
    assert len(recall) == 1 + 2 * 2
    for cells in recall[1:]:
        seg = {"utterance = merged": "utterance"}.get(cells[1], cells[1])
        o = report["results"][seg]["7class"][cells[0]]["overall"]
        assert cells[2:] == [pct(o["recall"][c]) for c in EMOTIONS] + [pct(o["uar"])]
    four = md_table(md, "### 4class")
    assert four[0] == ["model", "segments", "neutral", "angry", "sad", "happy", "UAR"]
    # a confusion matrix per model and view: rows gold, columns predicted
    matrix = md_table(md, "### first: utterance = merged, 7class")
    o = report["results"]["utterance"]["7class"]["first"]["overall"]
    assert matrix[0] == ["gold \\ predicted", *EMOTIONS]
    assert [[int(v) for v in cells[1:]] for cells in matrix[1:]] == o["confusion"]
    assert md.count("\n### ") == 2 + len(views) * 2
    # one table per breakdown kind: a row per model, view and group; the metrics as columns
    assert md.count("## By language") == 1 and md.count("## By corpus") == 1
    by_corpus = md_table(md, "## By corpus")
    assert by_corpus[0] == [
        "model",
        "segments",
        "protocol",
        "corpus",
        "n",
        "UAR",
        "UAR 95 % CI",
        "accuracy",
        "macro-F1",
    ]
    assert len(by_corpus) == 1 + len(views) * 2 * 2
    row = next(c for c in by_corpus if c[:4] == ["second", "2s", "7class", "emodb"])
    o = report["results"]["2s"]["7class"]["second"]["by_corpus"]["emodb"]
    assert row[4:6] == [str(o["n"]), pct(o["uar"])]


def test_spans_that_merge_make_three_distinct_views(tmp_path):
    a = ravdess("03-01-04-01-01-01-01.flac")
    rows = [ManifestRow(str(a), 0.0, 1.5, "sad"), ManifestRow(str(a), 1.5, 3.0, "sad")]
    report = evaluate(rows, [Scripted(by_length)], tmp_path / "cache", protocols=["7class"], bootstrap=0)
    assert report["same_segments"] == {"2s": "utterance"}  # no row is over 2 s; the two rows merge
    from serval.report import distinct_views, markdown_report

    assert [v[0] for v in distinct_views(report)] == ["utterance = 2s", "merged"]
    assert "2s = utterance: no row is longer than 2 s" in markdown_report(report)


# ----------------------------------------------------------------------------- training speakers


@pytest.mark.slow
def test_eval_warns_when_the_manifest_holds_the_default_models_training_speakers(tmp_path, capsys):
    from serval.corpora import prepare_corpus
    from serval.locations import DEFAULT_MODEL
    from serval.training_data import read_record

    record = read_record(DEFAULT_MODEL)
    if record is None:
        pytest.skip("the bundled model records no training data")
    rows, _ = prepare_corpus("ravdess", DATA / "ravdess")
    trained = [r for r in rows if r.speaker in record["train"]["ravdess"] and r.label == "angry"][:2]
    # the default model trained on every RAVDESS actor here: a speaker it never heard is one the record lacks
    held_out = [dataclasses.replace(r, speaker="ravdess-99") for r in trained]
    assert trained and "ravdess-99" not in record["train"]["ravdess"]
    outputs = {}
    for name, subset in (("trained", trained), ("held-out", held_out)):
        manifest = tmp_path / f"{name}.csv"
        write_manifest(subset, manifest)
        out = tmp_path / name
        argv = ["eval", str(manifest), "-o", str(out), "--segments", "utterance", "--protocols", "7class"]
        assert cli.main([*argv, "--bootstrap", "0", "--no-progress", "--engine", "torch"]) == 0
        outputs[name] = (capsys.readouterr().err, json.loads((out / "report.json").read_text()), out)
    err, report, out = outputs["trained"]
    speaker = trained[0].speaker
    assert (
        "warning" in err and speaker in err and "corpora ravdess" in err and "not speaker-independent" in err
    )
    entry = report["models"][0]
    assert entry["trained_on"] == sorted(record["train"])
    assert (
        entry["training_overlap"]["train"] == {"ravdess": {speaker: 2}}
        and entry["training_overlap"]["rows"] == 2
    )
    md = (out / "report.md").read_text()
    assert "## Training speakers in this manifest" in md and f"ravdess: {speaker} (2 rows)" in md
    err, report, out = outputs["held-out"]
    assert "warning" not in err
    assert report["models"][0]["training_overlap"] == {"train": {}, "dev": {}, "rows": 0}
    assert "## Training speakers in this manifest" not in (out / "report.md").read_text()


def test_a_fixed_protocol_leaves_out_the_seven_it_does_not_score_and_the_model_protocol_refuses_them():
    from types import SimpleNamespace

    rows = [ManifestRow("a.wav", label="angry"), ManifestRow("b.wav", label="fearful")]
    seven, calm = SimpleNamespace(classes=EMOTIONS), SimpleNamespace(classes=("calm", "angry"))
    assert labels_problem(rows, ["4class"], [seven]) is None  # fearful: outside 4class, left out of it
    assert labels_problem(rows, ["4class", "model"], [seven]) is None
    problem = labels_problem(rows, ["model"], [calm])
    assert problem == "row 2 (b.wav): label 'fearful' is not one of angry, calm"


def test_session_scoring_centres_each_corpus_and_a_lone_clip_keeps_its_answer(tmp_path, four_clips):
    rows, _ = four_clips
    answers = {}
    for row in rows:  # every clip leans to angry; its own class is second
        p = np.full(len(EMOTIONS), 0.2 / 5 if row.label != "angry" else 0.2 / 6, np.float32)
        p[EMOTIONS.index("angry")] = 0.5 if row.label != "angry" else 0.8
        if row.label != "angry":
            p[EMOTIONS.index(row.label)] = 0.3
        answers[wave_key(load_audio(row.path))] = p
    system = Scripted(lambda w: answers[wave_key(w)])
    common = dict(segmentations=["utterance"], protocols=["7class"], bootstrap=0)

    def uar(report):
        return report["results"]["utterance"]["7class"]["scripted"]["overall"]["uar"]

    plain = evaluate(rows, [system], tmp_path / "cache", **common)
    corpus = evaluate(rows, [system], tmp_path / "cache", session="corpus", **common)
    assert uar(plain) == pytest.approx(0.25) and uar(corpus) == pytest.approx(1.0)
    assert corpus["settings"]["session"] == "corpus" and plain["settings"]["session"] is None
    alone = [dataclasses.replace(r, speaker=f"s{i}") for i, r in enumerate(rows)]  # one clip per speaker
    assert uar(evaluate(alone, [system], tmp_path / "cache", session="speaker", **common)) == uar(plain)
    with pytest.raises(ValueError, match="session must be one of"):
        evaluate(rows, [system], tmp_path / "cache", session="folder", **common)
