"""The default model's outputs are byte-identical to the recorded ones (benchmarks/golden.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data").is_dir(), reason="needs ../shared/data")
def test_predict_and_eval_outputs_are_byte_identical():
    done = subprocess.run(
        [sys.executable, "benchmarks/golden.py"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all golden outputs identical" in done.stdout
