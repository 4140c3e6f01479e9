"""Metrics against scikit-learn and against small cases worked out by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
)

from serval.metrics import (
    accuracy,
    bootstrap_ci,
    ccc,
    classification_scores,
    mae,
    pearson,
    regression_scores,
    uar,
)

CLASSES = ["neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised"]


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    n = 300
    # skewed gold distribution, and a predictor that is right ~half the time
    gold = rng.choice(CLASSES, n, p=[0.35, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05])
    pred = np.where(rng.random(n) < 0.5, gold, rng.choice(CLASSES, n))
    s = classification_scores(list(gold), list(pred), CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert s["uar"] == pytest.approx(balanced_accuracy_score(gold, pred))
        assert s["accuracy"] == pytest.approx(accuracy_score(gold, pred))
        assert s["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
        recall = recall_score(gold, pred, labels=CLASSES, average=None)
    assert [s["recall"][c] for c in CLASSES] == pytest.approx(list(recall))
    assert s["confusion"] == confusion_matrix(gold, pred, labels=CLASSES).tolist()
    assert uar(list(gold), list(pred), CLASSES) == s["uar"]
    assert accuracy(list(gold), list(pred)) == s["accuracy"]


def test_class_absent_from_predictions_by_hand():
    # gold: 2 neutral, 2 sad, 1 angry; "angry" is never predicted
    gold = ["neutral", "neutral", "sad", "sad", "angry"]
    pred = ["neutral", "sad", "sad", "sad", "neutral"]
    s = classification_scores(gold, pred, ["neutral", "sad", "angry"])
    # recalls: neutral 1/2, sad 2/2, angry 0/1 -> UAR = (0.5 + 1 + 0) / 3
    assert s["uar"] == pytest.approx(0.5)
    assert s["recall"] == {"neutral": 0.5, "sad": 1.0, "angry": 0.0}
    assert s["accuracy"] == pytest.approx(3 / 5)
    # precision: neutral 1/2, sad 2/3, angry undefined -> 0; F1 neutral 0.5, sad 0.8, angry 0
    assert s["f1"]["neutral"] == pytest.approx(0.5)
    assert s["f1"]["sad"] == pytest.approx(0.8)
    assert s["f1"]["angry"] == 0.0
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert s["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert s["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))


def test_class_absent_from_gold_by_hand():
    # "happy" never occurs in gold but is predicted once: it has no recall and does not enter UAR
    gold = ["neutral", "neutral", "sad", "sad"]
    pred = ["neutral", "happy", "sad", "sad"]
    s = classification_scores(gold, pred, ["neutral", "happy", "sad"])
    assert s["recall"]["happy"] is None
    assert s["uar"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["support"] == {"neutral": 2, "happy": 0, "sad": 2}
    # F1: neutral P=1 R=.5 -> 2/3; happy 0 (predicted, so it is averaged in); sad 1
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert s["uar"] == pytest.approx(balanced_accuracy_score(gold, pred))
        assert s["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    # a class absent from both gold and predictions does not dilute macro-F1 either
    s7 = classification_scores(gold, pred, CLASSES)
    assert s7["macro_f1"] == pytest.approx(s["macro_f1"])
    assert s7["uar"] == pytest.approx(s["uar"])


def test_no_answer_counts_as_wrong_and_is_kept_apart():
    gold = ["neutral", "sad", "sad", "angry"]
    pred = ["neutral", None, "fearful", "angry"]  # None: unparseable; fearful: outside the 3 classes
    s = classification_scores(gold, pred, ["neutral", "sad", "angry"])
    assert s["n"] == 4
    assert s["no_answer"] == 2
    assert s["recall"]["sad"] == 0.0
    assert s["uar"] == pytest.approx(2 / 3)
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["confusion"] == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert s["confusion_no_answer"] == [0, 2, 0]


def test_bad_gold_label_is_an_error():
    with pytest.raises(ValueError, match="calm"):
        uar(["calm"], ["neutral"], CLASSES)
    with pytest.raises(ValueError, match="2 gold labels but 1"):
        uar(["sad", "sad"], ["sad"], CLASSES)


def test_bootstrap_ci_is_seeded_and_brackets_uar():
    rng = np.random.default_rng(0)
    gold = list(rng.choice(CLASSES[:4], 200))
    pred = [g if rng.random() < 0.6 else rng.choice(CLASSES[:4]) for g in gold]
    point = uar(gold, pred, CLASSES)
    lo, hi = bootstrap_ci(gold, pred, CLASSES, n_resamples=500, seed=3)
    assert lo < point < hi
    assert (lo, hi) == bootstrap_ci(gold, pred, CLASSES, n_resamples=500, seed=3)
    assert (lo, hi) != bootstrap_ci(gold, pred, CLASSES, n_resamples=500, seed=4)
    # a wider interval at 99 %
    lo99, hi99 = bootstrap_ci(gold, pred, CLASSES, n_resamples=500, seed=3, confidence=0.99)
    assert lo99 <= lo and hi99 >= hi
    # perfect predictions: every resample has UAR 1
    assert bootstrap_ci(gold, gold, CLASSES, n_resamples=50) == (1.0, 1.0)


def test_bootstrap_groups_move_together():
    # each utterance is two segments that are both right or both wrong; grouping must not matter
    # for the point estimate, but resampling whole utterances gives a wider interval than
    # pretending the 2 segments are independent
    rng = np.random.default_rng(1)
    gold_u = list(rng.choice(["neutral", "sad"], 60))
    right = rng.random(60) < 0.7
    pred_u = [g if r else ("sad" if g == "neutral" else "neutral") for g, r in zip(gold_u, right)]
    gold = [g for g in gold_u for _ in range(2)]
    pred = [p for p in pred_u for _ in range(2)]
    groups = [i for i in range(60) for _ in range(2)]
    lo_g, hi_g = bootstrap_ci(gold, pred, CLASSES, groups=groups, n_resamples=1000, seed=0)
    lo_i, hi_i = bootstrap_ci(gold, pred, CLASSES, n_resamples=1000, seed=0)
    assert hi_g - lo_g > hi_i - lo_i
    # grouped resampling of segments = plain resampling of utterances
    lo_u, hi_u = bootstrap_ci(gold_u, pred_u, CLASSES, n_resamples=1000, seed=0)
    assert (lo_g, hi_g) == pytest.approx((lo_u, hi_u))


def test_ccc_pearson_mae_by_hand():
    y = [0.1, 0.4, 0.5, 0.9]
    assert ccc(y, y) == pytest.approx(1.0)
    assert pearson(y, y) == pytest.approx(1.0)
    assert mae(y, y) == 0.0
    shifted = [v + 0.2 for v in y]
    # a constant shift keeps Pearson at 1 but costs CCC: 2 var / (2 var + 0.2^2)
    var = np.var(y)
    assert pearson(y, shifted) == pytest.approx(1.0)
    assert ccc(y, shifted) == pytest.approx(2 * var / (2 * var + 0.04))
    assert mae(y, shifted) == pytest.approx(0.2)
    assert pearson(y, [0.5] * 4) != pearson(y, [0.5] * 4)  # NaN for a constant prediction
    assert ccc(y, [0.5] * 4) == pytest.approx(0.0)
    x = np.array([0.3, 0.1, 0.8, 0.6])
    assert pearson(y, x) == pytest.approx(np.corrcoef(y, x)[0, 1])


def test_regression_scores_skip_unannotated():
    gold = np.array([[0.1, 0.2, np.nan], [0.5, 0.6, np.nan], [0.9, 0.1, np.nan]])
    pred = np.array([[0.2, 0.2, 0.5], [0.5, 0.5, 0.5], [0.8, 0.2, 0.5]])
    out = regression_scores(gold, pred, ["arousal", "valence", "dominance"])
    assert out["arousal"]["n"] == 3
    assert out["arousal"]["mae"] == pytest.approx((0.1 + 0 + 0.1) / 3)
    assert out["dominance"]["n"] == 0
    assert out["dominance"]["ccc"] != out["dominance"]["ccc"]  # NaN
    with pytest.raises(ValueError, match="must both be"):
        regression_scores(gold[:, :2], pred, ["arousal", "valence", "dominance"])


def test_calibration_by_hand():
    from serval.metrics import calibration

    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    cal = calibration(np.array([0, 1, 1]), probs)
    # tops 0.9 (right), 0.6 (wrong), 0.8 (right), each alone in its tenth: (0.1 + 0.6 + 0.2) / 3
    assert cal["ece"] == pytest.approx(0.3) and cal["accuracy"] == pytest.approx(2 / 3)
    assert cal["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.4) + np.log(0.8)) / 3)
    assert cal["confidence"] == pytest.approx(2.3 / 3)
