"""The shared vocabulary's record body: a dimension whose output was never trained is null, never a number."""

from __future__ import annotations

import math

from conftest import NULL_SCORES

from serval import vocab
from serval.vocab import DIMENSIONS


def test_vocab_scores_null_for_untrained_or_non_finite():
    assert vocab.scores([0.25, 0.5, 0.75], DIMENSIONS, ()) == NULL_SCORES
    assert vocab.scores([0.25, 0.5, 0.75], DIMENSIONS, ("valence",)) == {
        "arousal": None,
        "valence": 0.5,
        "dominance": None,
    }
    assert vocab.scores([math.nan, 0.5, math.inf], DIMENSIONS, DIMENSIONS) == {
        "arousal": None,
        "valence": 0.5,
        "dominance": None,
    }
    body = vocab.label_body([0.1, 0.9], [0.3, 0.6, 0.2], ("sad", "happy"), DIMENSIONS, trained=("arousal",))
    assert body == {"label": "happy", "probabilities": {"sad": 0.1, "happy": 0.9}, "scores": {
        "arousal": 0.3, "valence": None, "dominance": None}}  # fmt: skip
