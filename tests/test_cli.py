"""The `serval` command itself: --version, defaults in --help, model-spec errors, the first run's notice."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from serval import progress
from serval.cli import COMMANDS, build_parser, main
from serval.specs import spec_problem
from serval.version import __version__

REPO = Path(__file__).resolve().parents[1]


def serval(*args: str, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real `serval` command in a subprocess, with its own cache."""
    env = {**os.environ, "SERVAL_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "serval", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


# ---------------------------------------------------------------------------- --version and --help


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"serval {__version__}\n"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__


def test_predict_help_shows_its_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = flat(capsys.readouterr().out)
    assert "--batch-size BATCH_SIZE default: 16" in text  # no help of its own: the default is shown
    assert "--ray-gpus-per-actor RAY_GPUS_PER_ACTOR GPUs each actor holds (default 0)" in text  # said once
    assert "--engine {auto,torch,onnx} auto (default):" in text
    # flags show no "default: False"
    assert "--overwrite start -o afresh instead of resuming or refusing --" in text
    assert text.endswith("--no-progress ")


def parsers(parser: argparse.ArgumentParser):
    """A parser and every sub-command's parser under it, nested ones too."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_help_shows_an_empty_default(command):
    everything = list(parsers(build_parser(command)))
    own = [p for p in everything if p.prog.startswith(f"serval {command}")]
    assert len(own[0]._actions) > 1  # the command's own arguments were filled in
    for text in map(flat, (p.format_help() for p in own)):
        assert not re.search(r"default: (None|False|\[\]|)[) ]", text), text


def test_timeline_help_shows_a_default_the_help_did_not_say(capsys):
    with pytest.raises(SystemExit):
        main(["timeline", "--help"])
    text = flat(capsys.readouterr().out)
    assert re.search(r"--vad-threshold VAD_THRESHOLD .*?\(default:? 0\.\d+\)", text)
    assert "--vad leave windows without speech unscored (Silero VAD) --" in text  # a flag: no default


# ---------------------------------------------------------------------------- model specs


@pytest.fixture
def broken(tmp_path: Path, model_dir: Path, emodb_clips: list[Path]) -> dict[str, tuple[str, str]]:
    """Model specs that name no model: {case: (spec, words the one-line error must hold)}."""

    def folder(name: str, files: dict[str, bytes | str]) -> str:
        d = tmp_path / name
        d.mkdir()
        for f, data in files.items():
            (d / f).write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(d)

    weights = (model_dir / "model.safetensors").read_bytes()
    config = (model_dir / "config.json").read_text()
    good = Path(folder("good", {"config.json": config, "model.safetensors": weights}))
    return {
        "missing folder": ("does-not-exist", "no such file or directory"),
        "no config.json": (folder("empty", {}), "no config.json"),
        "bad config.json": (
            folder("badcfg", {"config.json": "{", "model.safetensors": weights}),
            "config.json",
        ),
        "no weights": (folder("noweights", {"config.json": config}), "no model.safetensors"),
        "truncated weights": (
            folder("trunc", {"config.json": config, "model.safetensors": weights[: len(weights) // 2]}),
            "truncated",
        ),
        "not safetensors": (
            folder("junk", {"config.json": config, "model.safetensors": b"garbage"}),
            "not a safetensors file",
        ),
        "bad ensemble.json": (folder("ens1", {"ensemble.json": "members: [a]"}), "ensemble.json"),
        "ensemble without members": (folder("ens2", {"ensemble.json": '{"models": ["a"]}'}), '"members"'),
        "ensemble member missing": (
            folder("ens3", {"ensemble.json": json.dumps({"members": [str(good), "gone"]})}),
            "ensemble member gone: no such folder",
        ),
        "unknown scheme": ("hf:openai/whisper-base", "unknown scheme hf:"),
        "a backbone, not a model": ("pypi:whisper-base", "unknown scheme pypi:"),
        "meralion without a path": ("meralion:", "meralion:DIR"),
        "meralion missing": ("meralion:" + str(tmp_path / "gone"), "no such MERaLiON-SER checkpoint"),
        "emotion2vec variant": ("emotion2vec:huge", "emotion2vec:large|base|seed"),
        "llm without a url": ("llm:gpt-4o-audio-preview", "llm:MODEL@BASE_URL"),
        "an audio file": (str(emodb_clips[0]), "a file, not a model directory"),
    }


def one_line_error(err: str, prefix: str, spec: str, words: str) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"{prefix}: {spec}: "), err
    assert words in err, err
    assert "Traceback" not in err and "ONNX" not in err and "torch" not in err, err


def test_every_bad_model_spec_is_one_line_naming_it(broken, emodb_clips, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SERVAL_CACHE", str(tmp_path / "cache"))
    for case, (spec, words) in broken.items():
        assert main(["predict", "--model", spec, str(emodb_clips[0])]) == 2, case
        captured = capsys.readouterr()
        assert captured.out == "", case
        one_line_error(captured.err, "serval predict", spec, words)
    assert not (tmp_path / "cache").exists()  # nothing was loaded or exported


@pytest.mark.parametrize(
    "argv",
    [
        ["timeline", "--model", "{spec}", "{clip}"],
        ["serve", "--model", "{spec}"],
        ["mcp", "--model", "{spec}"],
        ["export", "onnx", "-o", "{out}", "{spec}"],
        ["eval", "{clip}", "-o", "{out}", "--model", "default", "--model", "{spec}"],
        ["pseudolabel", "{clip}", "-o", "{out}.csv", "--teacher", "{spec}"],
        ["pseudolabel", "{clip}", "-o", "{out}.csv", "--relabel", "{spec}"],
    ],
)
def test_every_command_checks_its_model_spec_first(argv, emodb_clips, tmp_path, capsys):
    spec = str(tmp_path / "no-such-model")
    fill = {"spec": spec, "clip": str(emodb_clips[0]), "out": str(tmp_path / "out")}
    assert main([a.format(**fill) for a in argv]) == 2
    one_line_error(capsys.readouterr().err, f"serval {argv[0]}", spec, "no such file or directory")
    assert not list(tmp_path.glob("out*"))


def test_the_real_command_says_the_problem_first(emodb_clips, tmp_path):
    done = serval("predict", "--model", "does-not-exist", str(emodb_clips[0]), cache=tmp_path / "cache")
    assert done.returncode == 2 and done.stdout == ""
    one_line_error(done.stderr, "serval predict", "does-not-exist", "no such file or directory")


def test_good_specs_pass_the_check(model_dir, tmp_path):
    ensemble = tmp_path / "ensemble"
    for member in ("a", "b"):
        shutil.copytree(model_dir, ensemble / member)
    (ensemble / "ensemble.json").write_text(json.dumps({"members": ["a", "b"]}))
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"")
    for spec in [
        None,
        "default",
        str(model_dir),
        str(ensemble),
        str(graph),
        "owner/name",  # a Hub id: fetched (or not) when loaded
        "meralion:MERaLiON/MERaLiON-SER-v1",
        f"meralion:{model_dir}",
        "emotion2vec:base",
        "llm:gpt-4o-audio-preview@https://api.openai.com/v1",
    ]:
        assert spec_problem(spec) is None, spec


# ---------------------------------------------------------------------------- the first run's notice


def test_nested_notices_print_one_line(capsys):
    with progress.once_notice("outer step"):
        with progress.once_notice("inner step"):
            pass
    with progress.once_notice("next step"):
        pass
    assert capsys.readouterr().err == "serval: outer step …\nserval: next step …\n"


@pytest.mark.slow
def test_first_run_of_the_default_model_is_one_notice(emodb_clips, tmp_path):
    """The bundled model's first run fills its shipped graph's weights: one line, then none."""
    cache = tmp_path / "cache"
    first = serval("predict", str(emodb_clips[0]), "--no-progress", cache=cache)
    assert first.returncode == 0, first.stderr
    notices = [line for line in first.stderr.splitlines() if line.startswith("serval: ")]
    assert len(notices) == 1 and notices[0].startswith(
        "serval: preparing the default model for ONNX Runtime (once"
    ), notices
    second = serval("predict", str(emodb_clips[0]), "--no-progress", cache=cache)
    assert second.returncode == 0 and "serval: " not in second.stderr, second.stderr
