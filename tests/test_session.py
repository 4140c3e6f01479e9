"""Session mode (serval.session): a group's lean taken away, in the API and `serval predict --session`,
on real clips with a tiny random model (whose answers lean hard to one class, as an untrained net's do)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import serval
from serval.cli import main
from serval.clip import Clip
from serval.metrics import classification_scores
from serval.session import SHRINK, calibrate, centre, groups_of
from serval.vocab import EMOTIONS


def _lean(probs: np.ndarray) -> np.ndarray:
    """Each class's mean log-probability over the group, less the smallest: which way the group leans."""
    m = np.log(probs).mean(0)
    return m - m.min()


def test_a_group_keeps_the_share_of_its_lean_that_its_size_leaves():
    rng = np.random.default_rng(0)
    for n in (2, 5, 40):
        logits = rng.normal(size=(n, 7)) + np.array([3.0, 0, 0, 0, 0, 0, 0])  # every clip leans to class 0
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        q = centre(p)
        np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-12)
        np.testing.assert_allclose(_lean(q), SHRINK / (n + SHRINK) * _lean(p), atol=1e-9)
    one = np.array([[0.7, 0.2, 0.1]])
    np.testing.assert_allclose(centre(one), one)  # alone, a clip is its own answer
    lacking = np.array([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0], [0.6, 0.4, 0.0]])  # a system without class 2
    assert (centre(lacking)[:, 2] == 0).all() and centre(lacking)[0].argmax() == 1


def test_a_corpus_wide_lean_is_taken_away_and_the_emotions_come_back():
    # 7 classes x 20 clips whose own evidence is right, and a lean to angry that swamps it (a language
    # the model never heard, calling most of it angry)
    rng = np.random.default_rng(1)
    gold = np.repeat(np.arange(7), 20)
    logits = rng.normal(size=(140, 7)) + 2.0 * np.eye(7)[gold]
    logits[:, EMOTIONS.index("angry")] += 4.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    def uar(probs):
        pred = [EMOTIONS[k] for k in probs.argmax(1)]
        return classification_scores([EMOTIONS[g] for g in gold], pred, EMOTIONS)["uar"]

    assert np.mean(p.argmax(1) == EMOTIONS.index("angry")) > 0.8 and uar(p) < 0.3
    assert uar(centre(p)) > 0.6


def test_calibrate_leaves_errors_and_silence_alone_and_says_the_group():
    def record(p, speech=True):
        label = ("sad", "angry")[int(p[1] > p[0])] if speech else None
        return {"file": "f", "label": label, "probabilities": dict(zip(["sad", "angry"], p)), "scores": {}}

    records = [record([0.45, 0.55]), record([0.1, 0.9]), {"file": "bad", "error": "bad: not audio"}]
    records += [record([0.9, 0.1], speech=False), record([0.45, 0.55])]
    out = calibrate(records, ["a", "a", "a", "a", "b"])
    assert out[2] == records[2] and out[3] == records[3]  # no label: not counted, not changed
    assert out[0]["session"] == {"group": "a", "clips": 2} and out[4] == records[4] | {
        "session": {"group": "b", "clips": 1}
    }
    # the group leans to angry; the clip that leans less than the group is now sad
    assert [out[0]["label"], out[1]["label"]] == ["sad", "angry"]
    assert records[0]["label"] == "angry" and "session" not in records[0]  # the inputs are not changed
    with pytest.raises(ValueError, match="3 session groups for 5 records"):
        calibrate(records, ["a"] * 3)


def test_session_groups_of_inputs():
    clips = [Clip("d1/a.wav", speaker="s1"), Clip("d2/b.wav", speaker="s2"), Clip("d1/c.wav", speaker="s1")]
    assert groups_of(clips, "all") == ["all"] * 3
    assert groups_of(clips, "folder") == ["d1", "d2", "d1"]
    assert groups_of(clips, "speaker") == ["s1", "s2", "s1"]
    with pytest.raises(ValueError, match=r"1 of 2 inputs have no speaker \(first: x.wav\)"):
        groups_of([Clip("x.wav"), Clip("y.wav", speaker="s")], "speaker")


@pytest.fixture()
def two_folders(tmp_path, ravdess_clips, emodb_clips):
    for name, clips in (("ravdess", ravdess_clips[:4]), ("emodb", emodb_clips[:3])):
        (tmp_path / name).mkdir()
        for clip in clips:
            shutil.copy(clip, tmp_path / name / clip.name)
    return tmp_path


def test_predict_session_by_folder_is_calibrate_of_the_plain_records(model_dir, two_folders, capsys):
    common = ["predict", str(two_folders / "ravdess"), str(two_folders / "emodb"), "--model", str(model_dir)]
    assert main([*common, "--format", "json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*common, "--format", "json", "--session", "folder"]) == 0
    session = json.loads(capsys.readouterr().out)
    folders = [str(two_folders / "ravdess")] * 4 + [str(two_folders / "emodb")] * 3
    want = calibrate(plain, folders)
    assert [r["session"] for r in session] == [
        {"group": f, "clips": 4 if "ravdess" in f else 3} for f in folders
    ]
    assert [r["label"] for r in session] == [r["label"] for r in want]
    for r, w in zip(session, want):
        assert all(abs(r["probabilities"][c] - v) < 1e-5 for c, v in w["probabilities"].items())
    # each folder keeps SHRINK / (n + SHRINK) of its lean (to rounding of the records' 6 digits)
    for name, n in (("ravdess", 4), ("emodb", 3)):
        before, after = (
            np.array([list(r["probabilities"].values()) for r in records if name in r["file"]])
            for records in (plain, session)
        )
        assert _lean(before).max() > 1e-3
        np.testing.assert_allclose(_lean(after), SHRINK / (n + SHRINK) * _lean(before), atol=1e-4)


def test_predict_session_refuses_what_it_cannot_do(model_dir, two_folders, tmp_path, capsys):
    folder = str(two_folders / "emodb")
    assert main(["predict", folder, "--model", str(model_dir), "--session", "speaker"]) == 2
    assert "have no speaker (first: " in capsys.readouterr().err
    out = tmp_path / "out.jsonl"
    out.write_text("keep me")  # written at the end, so never resumed: never overwritten either
    assert main(["predict", folder, "--model", str(model_dir), "--session", "all", "-o", str(out)]) == 2
    assert out.read_text() == "keep me" and "--overwrite" in capsys.readouterr().err
    args = ["predict", folder, "--model", str(model_dir), "--session", "all", "-o", str(out), "--ray", "2"]
    assert main(args) == 2 and "without --ray" in capsys.readouterr().err


def test_predict_session_by_a_manifest_speaker(model_dir, ravdess_clips, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    rows = [f"{c},{'a' if i % 2 else 'b'}" for i, c in enumerate(ravdess_clips[:6])]
    manifest.write_text("path,speaker\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out.jsonl"
    assert (
        main(["predict", str(manifest), "--model", str(model_dir), "--session", "speaker", "-o", str(out)])
        == 0
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["session"]["group"] for r in records] == ["b", "a"] * 3
    assert all(r["session"]["clips"] == 3 for r in records)


def test_the_api_session_is_calibrate_of_its_records(model_dir, ravdess_clips):
    model = serval.load(model_dir)
    files = [str(c) for c in ravdess_clips[:5]]
    plain = model.predict(files)
    for session, groups in (
        (True, ["all"] * 5),
        (["s1", "s1", "s2", "s2", "s2"], ["s1", "s1", "s2", "s2", "s2"]),
    ):
        got, want = model.predict(files, session=session), calibrate(plain, groups)
        assert [r["label"] for r in got] == [r["label"] for r in want]
        assert [r["session"] for r in got] == [r["session"] for r in want]
    with pytest.raises(ValueError, match="give a list"):
        model.predict(files[0], session=True)
