"""`serval predict --ray` and `serval pseudolabel --ray` on a local Ray cluster of 2 CPUs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("ray.data")

from serval.audio import load_audio  # noqa: E402
from serval.checkpoint import save_model  # noqa: E402
from serval.cli import main  # noqa: E402
from serval.io import ray_pool  # noqa: E402
from serval.model import SERConfig, SERModel  # noqa: E402
from serval.vocab import SAMPLE_RATE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "predict-examples.json"  # the single-process run of examples/


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray = ray_pool.init_ray(ray_pool.RaySettings(num_cpus=2))
    yield ray
    ray.shutdown()


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _same(records: list[dict], want: list[dict]) -> None:
    assert [(r["file"], r["label"], r["duration"]) for r in records] == [
        (r["file"], r["label"], r["duration"]) for r in want
    ]
    for r, w in zip(records, want):
        for k in ("probabilities", "scores"):
            # a null (untrained) score is null on both sides
            assert all(v is r[k][c] is None or abs(r[k][c] - v) < 1e-5 for c, v in w[k].items())


@pytest.mark.slow
def test_predict_on_ray_gives_the_single_process_records_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the golden records name their files relative to the repository
    out = tmp_path / "x.jsonl"
    args = ["predict", "examples/", "--ray", "-o", str(out), "--no-progress", "--batch-size", "4"]
    assert main(args) == 0
    _same(_lines(out), json.loads(GOLDEN.read_text()))
    assert not Path(f"{out}.shards").exists()  # merged into -o, then removed

    before = out.read_bytes()
    assert main(args) == 0  # a rerun adds nothing
    assert out.read_bytes() == before and "7 of 7" in capsys.readouterr().err

    # a run killed after one shard was written and two records merged: the rerun does only the rest
    lines = before.decode().splitlines(keepends=True)
    out.write_text("".join(lines[:2]))
    shards = Path(f"{out}.shards")
    shards.mkdir()
    (shards / "000000.jsonl").write_text("".join(lines[2:5]))
    assert main(args) == 0
    assert "5 of 7" in capsys.readouterr().err
    _same(_lines(out), _lines_of(before))
    assert not shards.exists()


def _lines_of(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


@pytest.mark.slow
def test_ray_needs_jsonl_output(capsys):
    assert main(["predict", str(ROOT / "examples"), "--ray"]) == 2
    assert "-o FILE.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_pseudolabel_on_ray_equals_the_local_run(tmp_path):
    torch.manual_seed(1)
    teacher = tmp_path / "t1"
    save_model(SERModel(SERConfig.tiny()), teacher)
    audio = tmp_path / "audio"
    audio.mkdir()
    pool = [
        load_audio(p)
        for p in sorted((ROOT.parent / "shared" / "data" / "ravdess" / "Actor_05").glob("*"))[:6]
    ]
    for i in range(2):
        x = np.concatenate(pool[i:] + pool[:i])[: 11 * SAMPLE_RATE]
        sf.write(audio / f"rec{i}.flac", x, SAMPLE_RATE)
    outs = []
    for name, extra in (("local", []), ("ray", ["--ray"])):
        out = tmp_path / name / "labels.jsonl"
        argv = ["pseudolabel", str(audio), "--teacher", str(teacher), "-o", str(out), "--no-progress"]
        assert main([*argv, "--min-emotional", "1", *extra]) in (0, 1)
        outs.append([out.read_text(), out.with_suffix(".windows.jsonl").read_text()])
    assert outs[0] == outs[1] and outs[0][1].count("\n") >= 2 * 5
