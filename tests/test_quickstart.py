"""The README's training quick-start, run exactly as written: its commands are read from README.md's
fenced block between the quickstart markers, and run in a fresh folder laid out like a clone beside
../shared/data, whose RAVDESS is a subset of the real clips (links), so that the run takes minutes."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, RAVDESS_CODES, REPO

from serval.vocab import EMOTIONS

BEGIN, END = "<!-- quickstart:begin -->", "<!-- quickstart:end -->"
ACTORS = [f"{a:02d}" for a in range(1, 11)]  # 10 speakers: the default split holds out 1 for test, 4 for dev


def quickstart_commands(readme: str) -> list[list[str]]:
    """The command lines of the README's quick-start block, split as a shell would (comments dropped)."""
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    body = block.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in body.splitlines() if line.strip()]


def fresh_clone(root: Path) -> Path:
    """`root/serval` with the repository's configs and examples, beside `root/shared/data/ravdess`: the
    actors' one-sentence clips of the 7 classes (one each), as links to ../shared/data."""
    repo = root / "serval"
    repo.mkdir()
    (repo / "configs").mkdir()
    for config in (REPO / "configs").glob("*.yaml"):
        (repo / "configs" / config.name).write_text(config.read_text())
    (repo / "examples").symlink_to(REPO / "examples")
    for actor in ACTORS:
        folder = root / "shared" / "data" / "ravdess" / f"Actor_{actor}"
        folder.mkdir(parents=True)
        for code in RAVDESS_CODES:
            clip = DATA / "ravdess" / f"Actor_{actor}" / f"03-01-{code}-01-01-01-{actor}.flac"
            if not clip.is_file():
                pytest.skip(f"{clip} not found")
            (folder / clip.name).symlink_to(clip)
    return repo


def run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    assert command[0] == "serval", command
    done = subprocess.run(
        [sys.executable, "-m", "serval", *command[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, (
        f"{shlex.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


@pytest.mark.slow
def test_the_readme_quickstart_trains_a_model_that_predicts(tmp_path, monkeypatch):
    commands = quickstart_commands((REPO / "README.md").read_text())
    assert [c[:2] for c in commands] == [
        ["serval", "data"],
        ["serval", "data"],
        ["serval", "train"],
        ["serval", "predict"],
        ["serval", "eval"],
    ]
    repo = fresh_clone(tmp_path)
    if not os.environ.get("SERVAL_CACHE"):  # never the user's cache
        monkeypatch.setenv("SERVAL_CACHE", str(tmp_path / "serval-cache"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    outputs = [run(c, repo, env) for c in commands]

    best = repo / "runs" / "quickstart" / "best"
    config = json.loads((best / "config.json").read_text())
    assert (config["d_model"], config["encoder_layers"]) == (512, 6)  # whisper-base
    trained = config["training_data"]
    assert list(trained["train"]) == ["ravdess"] and len(trained["train"]["ravdess"]) == 5
    assert len(trained["dev"]["ravdess"]) == 4
    final = json.loads((repo / "runs" / "quickstart" / "final.json").read_text())
    assert final["test"]["n"] == len(RAVDESS_CODES)  # the held-out actor's clips, scored at the end

    # the trained model labels every example, and its probabilities are probabilities
    table = outputs[3].stdout
    examples = sorted(p.name for p in (REPO / "examples").glob("*.flac"))
    assert all(name in table for name in examples), table
    import serval

    records = serval.load(best, device="cpu").predict([str(REPO / "examples" / n) for n in examples])
    for record in records:
        assert record["label"] in EMOTIONS
        assert sum(record["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    # the test speaker is none of the model's training speakers: no warning, and the report says so
    assert "warning" not in outputs[4].stderr
    report = json.loads((repo / "runs" / "quickstart-eval" / "report.json").read_text())
    assert report["models"][0]["training_overlap"]["train"] == {}
    assert report["n_rows"] == len(RAVDESS_CODES)
