"""The default model's outputs agree with the recorded ones within fp32 tolerance (benchmarks/golden.py),
and that comparison accepts what another CPU changes and nothing more."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import golden  # noqa: E402
from golden import (  # noqa: E402
    PREDICT,
    REPORT_JSON,
    REPORT_MD,
    SPANS,
    TOL,
    compare,
    compare_label,
    compare_markdown,
)


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT.parent / "shared" / "data").is_dir(), reason="needs ../shared/data")
def test_predict_and_eval_outputs_agree_with_the_golden_ones():
    done = subprocess.run(
        [sys.executable, "benchmarks/golden.py"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"all golden outputs agree within {TOL:g}" in done.stdout


@pytest.fixture(scope="module")
def recorded() -> dict[str, str]:
    return {name: (golden.GOLDEN / name).read_text() for name in (PREDICT, SPANS, REPORT_JSON, REPORT_MD)}


def changed(texts: dict[str, str], name: str, edit) -> dict[str, str]:
    """A copy of the outputs with `edit` applied to the parsed JSON of `name`."""
    data = json.loads(texts[name])
    edit(data)
    return {**texts, name: json.dumps(data, indent=2)}


def test_the_golden_files_agree_with_themselves_and_hold_no_near_tie(recorded):
    assert compare(recorded, dict(recorded)) == ([], [])
    # every label is a clear call: the report's label-derived metrics are always compared
    assert golden.near_ties(recorded) == []


def test_probabilities_and_scores_are_compared_to_the_tolerance(recorded):
    def shift(by):
        def edit(records):
            records[0]["probabilities"]["angry"] += by
            records[1]["scores"]["valence"] -= by

        return edit

    assert compare(recorded, changed(recorded, PREDICT, shift(0.5 * TOL)))[0] == []
    problems = compare(recorded, changed(recorded, PREDICT, shift(3 * TOL)))[0]
    assert len(problems) == 2 and "angry" in problems[0] and "valence" in problems[1]
    problems = compare(recorded, changed(recorded, SPANS, lambda r: r[4]["scores"].update(arousal=0.1)))[0]
    assert len(problems) == 1 and "arousal" in problems[0]


def test_a_clear_label_must_match_and_a_near_tie_may_go_either_way(recorded):
    problems = compare(recorded, changed(recorded, PREDICT, lambda r: r[0].update(label="sad")))[0]
    assert len(problems) == 1 and "label 'sad', golden 'angry'" in problems[0]
    probs = {"neutral": 0.45, "happy": 0.45005, "sad": 0.09995, "angry": 0.0}
    assert compare_label(probs, "happy", list(probs), "x") == ([], False)
    assert compare_label(probs, "neutral", list(probs), "x") == ([], True)  # margin 5e-5 <= 2 * TOL
    assert compare_label(probs, "sad", list(probs), "x")[0]
    assert compare_label(probs, "sad", ["sad", "angry"], "x") == ([], False)  # the argmax of a subset
    clear = {**probs, "happy": 0.4503}  # margin 3e-4: two values within TOL cannot swap
    assert compare_label(clear, "neutral", list(clear), "x")[0]


def test_an_eval_span_near_tie_is_found_under_every_protocol(recorded):
    """A clear 7-class call whose 4-class call is a near tie: the 4-class flip is noticed."""

    def four_class_tie(flipped: bool):
        def edit(records):
            q = records[0]["probabilities"]
            q.update({c: 0.0 for c in q}, surprised=0.9, neutral=0.05, angry=0.05)
            q["angry" if flipped else "neutral"] += 0.5 * TOL

        return edit

    want = changed(recorded, SPANS, four_class_tie(False))
    problems, notes = compare(want, changed(recorded, SPANS, four_class_tie(True)))
    assert problems == [] and notes and "report not compared" in notes[0]
    assert compare(want, want) == ([], [])


def test_a_near_tie_that_went_the_other_way_skips_the_report_it_feeds(recorded):
    def near_tie(data, tied):
        top, second = sorted(data[0]["probabilities"], key=lambda c: -data[0]["probabilities"][c])[:2]
        data[0]["probabilities"][top] = 0.5
        data[0]["probabilities"][second] = 0.5 - 0.4 * TOL if tied == "golden" else 0.5 + 0.4 * TOL

    want = changed(recorded, SPANS, lambda r: near_tie(r, "golden"))
    got = changed(recorded, SPANS, lambda r: near_tie(r, "now"))
    got = changed(got, REPORT_JSON, lambda r: r.update(n_rows=0))  # must not be looked at
    problems, notes = compare(want, got)
    assert problems == [] and len(notes) == 1 and "report not compared" in notes[0]


def test_the_report_json_is_compared_field_by_field(recorded):
    def uar(by):
        return lambda r: r["results"]["2s"]["7class"]["serval-base-emo"]["overall"].update(
            uar=r["results"]["2s"]["7class"]["serval-base-emo"]["overall"]["uar"] + by
        )

    assert compare(recorded, changed(recorded, REPORT_JSON, uar(1e-9)))[0] == []
    problems = compare(recorded, changed(recorded, REPORT_JSON, uar(0.01)))[0]
    assert len(problems) == 1 and "2s.7class.serval-base-emo.overall.uar" in problems[0]
    extra = changed(recorded, REPORT_JSON, lambda r: r.update(n_rows=12))
    assert "n_rows: 12, golden 11" in compare(recorded, extra)[0][0]


def test_markdown_numbers_agree_to_their_last_printed_digit():
    want = "| m | 2s | 64.29 | 52.47–83.33 | 11 |\n| UAR (n=4) | 100.00 |\n"
    assert compare_markdown(want, want.replace("64.29", "64.30"), "md") == []  # a rounding boundary
    assert compare_markdown(want, want.replace("64.29", "64.31"), "md")
    assert compare_markdown(want, want.replace("64.29", "64.3"), "md")
    assert compare_markdown(want, want.replace("| 11 |", "| 12 |"), "md")  # integers: exact
    assert compare_markdown(want, want.replace("(n=4)", "(n=5)"), "md")
    assert compare_markdown(want, want.replace("UAR", "WAR"), "md")
    assert compare_markdown(want, want + "| extra |\n", "md")
    assert compare_markdown(want, copy.copy(want), "md") == []
