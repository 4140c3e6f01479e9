"""One install, every command: against the package installed in this environment, as a user runs it.

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


def serval(
    *args: str, cwd, missing: tuple[str, ...] = (), timeout: float = 600, **kw
) -> subprocess.CompletedProcess:
    """`serval ARGS` in a subprocess, with the `missing` packages made unimportable.

    It runs in `cwd`, away from the checkout, so that it imports the installed package.
    """
    code = (
        "import sys\n"
        f"for name in {list(missing)!r}:\n"
        "    sys.modules[name] = None  # import of it raises ModuleNotFoundError, as when not installed\n"
        "from serval.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def one_clean_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_needs_no_optional_package(command, tmp_path):
    done = serval(command, "--help", cwd=tmp_path, missing=OPTIONAL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: serval {command}") and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args, package, pip",
    [
        (["serve"], "fastapi", "pip install 'fastapi'"),
        (["serve"], "uvicorn", "pip install 'uvicorn'"),
        (["mcp"], "mcp", "pip install 'mcp'"),
        (["eval", "MANIFEST", "-o", "OUT"], "matplotlib", "pip install 'matplotlib'"),
        (["timeline", "CLIP", "-o", "OUT/t"], "matplotlib", "pip install matplotlib"),
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
    code = "import sys\nfrom serval.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
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
    code = "import sys\nfrom serval.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "mcp", "--device", "cpu"],
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
    assert "Traceback" not in err, err
