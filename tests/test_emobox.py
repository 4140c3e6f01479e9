"""`serval benchmark emobox`: EmoBox's fold files read as they are, clips found by stem, per-fold figures."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import DATA
from test_train import TINY, tiny_init

from serval.cli import main
from serval.emobox import SEED, AudioIndex, label_map, read_clips, read_fold, run_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")
EMOBOX = DATA.parent / "reference" / "emobox"


def small_folds(root: Path, n_train: int = 40, n_test: int = 12) -> Path:
    """EmoDB's fold 1 cut to a few clips of the speakers here, plus one clip not here in each file."""
    have = {p.stem for p in (DATA / "emodb").glob("*.flac")}
    fold = root / "emodb" / "fold_1"
    fold.mkdir(parents=True)
    (root / "emodb" / "label_map.json").write_text((EMOBOX / "emodb" / "label_map.json").read_text())
    for part, n in (("train", n_train), ("test", n_test)):
        lines = (EMOBOX / "emodb" / "fold_1" / f"emodb_{part}_fold_1.jsonl").read_text().splitlines()
        here = [x for x in lines if Path(json.loads(x)["wav"]).stem in have]
        absent = next(x for x in lines if Path(json.loads(x)["wav"]).stem not in have)
        keep = here[:: max(1, len(here) // n)][:n]  # the files are sorted by emotion: every class
        (fold / f"emodb_{part}_fold_1.jsonl").write_text("\n".join([*keep, absent]) + "\n")
    return root


def test_labels_are_the_corpus_own_in_serval_words():
    labels = label_map(EMOBOX, "emodb")
    assert labels["anger"] == "angry" and labels["boredem"] == "boredom" and labels["fear"] == "fearful"
    assert label_map(EMOBOX, "emovo") == {}  # EmoBox has no map for EMOVO: its own codes stay
    clips = read_clips(EMOBOX / "emovo" / "fold_1" / "emovo_test_fold_1.jsonl", {})
    assert {c.label for c in clips} == {"gio", "dis", "pau", "rab", "sor", "tri", "neu"}


def test_index_finds_by_stem_and_trailing_folders(tmp_path):
    # CASIA's stems repeat across speakers and emotions: the folders above tell them apart
    for speaker in ("liuchanhg", "wangzhe"):
        for emotion in ("angry", "neutral"):
            (tmp_path / speaker / emotion).mkdir(parents=True)
            sf.write(tmp_path / speaker / emotion / "201.flac", np.zeros(1600, np.float32), 16000)
    sf.write(tmp_path / "03a01Wa.flac", np.zeros(1600, np.float32), 16000)
    index = AudioIndex(tmp_path)
    assert (
        index.find("downloads/casia/Wangzhe/Neutral/201.wav") == tmp_path / "wangzhe" / "neutral" / "201.flac"
    )
    assert index.find("downloads/emodb/wav/03a01Wa.wav") == tmp_path / "03a01Wa.flac"
    assert index.find("downloads/casia/zhaoquanyin/angry/201.wav") is None  # not here: no guess
    assert index.find("downloads/emodb/wav/03a01Fa.wav") is None


def test_fold_split_is_emobox_80_20_with_seed_12(tmp_path):
    folds = small_folds(tmp_path / "folds")
    fold = read_fold(folds, "emodb", 1, AudioIndex(DATA / "emodb"), label_map(folds, "emodb"))
    assert fold.totals == {"train": 41, "test": 13} and fold.found("train") == 40 and fold.found("test") == 12
    assert len(fold.missing["train"]) == 1 and len(fold.missing["test"]) == 1
    splits = [s for _, _, s in fold.rows]
    # EmoBox's recipe: the clips it has, in file order; random.seed(12); shuffle the indices; int(0.8 n) train
    assert splits.count("dev") == 40 - int(40 * 0.8) and splits.count("train") == 32
    order = list(range(40))
    random.Random(SEED).shuffle(order)
    assert {i for i, s in enumerate(splits[:40]) if s == "dev"} == set(order[32:])
    assert set(splits[40:]) == {"test"}


@pytest.mark.slow
def test_benchmark_trains_and_reports_each_fold(tmp_path, capsys):
    folds = small_folds(tmp_path / "folds")
    out = tmp_path / "out"
    sets = [
        *TINY,
        "optim.epochs=1",
        "optim.batch_size=8",
        "select.linear_head=false",
        "model.layer_stats=false",
    ]
    args = [
        "benchmark",
        "emobox",
        "emodb",
        "--folds",
        str(folds),
        "--audio",
        str(DATA / "emodb"),
        "-o",
        str(out),
    ]
    args += ["--init", str(tiny_init(tmp_path / "start"))] + [f"--set={s}" for s in sets]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert "boredom" in report["classes"] and "surprised" not in report["classes"]
    fold = report["folds"][0]
    assert fold["found"] == {"train": 40, "test": 12} and fold["total"] == {"train": 41, "test": 13}
    assert len(fold["missing"]["test"]) == 1 and fold["missing"]["test"][0] in printed
    assert fold["n"] == 12 and all(0.0 <= fold[m] <= 1.0 for m in ("uar", "wa", "macro_f1"))
    assert report["mean"]["uar"] == pytest.approx(fold["uar"])
    assert "| 1 | 40 of 41 | 12 of 13 |" in printed
    # a second run reuses the fold's result instead of training again
    run = out / "fold_1" / "run"
    before = sorted(p.name for p in run.iterdir())
    again = run_benchmark("emodb", folds, DATA / "emodb", out, str(tmp_path / "start"), None, sets)
    assert again["folds"][0]["uar"] == fold["uar"] and sorted(p.name for p in run.iterdir()) == before


def test_missing_folds_are_an_error_naming_the_folder(tmp_path, capsys):
    args = ["benchmark", "emobox", "nosuch", "--folds", str(EMOBOX), "--audio", str(tmp_path)]
    assert main(args) == 1
    assert "nosuch: no EmoBox folds" in capsys.readouterr().err
