"""Session calibration: a group of clips (one speaker, one call, one dataset) as its own reference.

A model carries the class balance and recording habits of its training corpora into a new one: on a
language it never heard it may call most clips angry. When clips come in groups that each hold a mix
of emotions, a group's mean log-probability per class says which way the whole group leans, whatever
each clip says; taking that lean away centres the group. A group of n clips gives up the share
n / (n + SHRINK) of its lean, so a small group moves less than a large one, and one clip not at all.

It assumes a mix: a group of clips of one emotion is pushed away from that emotion. Measured under
leave-one-corpus-out in MODEL_CARD.md ("Session mode"), with groups of each size and skew.
Torch-free; it reads and writes records (`serval.vocab.label_body`'s), so every engine shares it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import PurePath

import numpy as np

from serval.vocab import DIGITS

SHRINK = 2.0  # n / (n + 2): half the lean for 2 clips, 5/6 of it for 10 (MODEL_CARD.md: the sizes tried)
FLOOR = 1e-6  # the smallest probability the log reads (records are rounded to 6 digits)


def centre(probs: np.ndarray, shrink: float = SHRINK) -> np.ndarray:
    """One group's probabilities [n, classes] -> the same with the group's lean taken away (rows sum to 1)."""
    p = np.asarray(probs, np.float64)
    if len(p) < 2:
        return p / p.sum(1, keepdims=True)
    # a class the system never gives (a baseline without it: 0 everywhere) stays at 0, not lifted
    live = (p > FLOOR).any(0)
    logp = np.log(np.clip(p[:, live], FLOOR, None))
    logp -= len(p) / (len(p) + shrink) * logp.mean(0)
    q = np.zeros_like(p)
    q[:, live] = np.exp(logp - logp.max(1, keepdims=True))
    return q / q.sum(1, keepdims=True)


def calibrate(records: list[dict], groups: Sequence[Hashable], shrink: float = SHRINK) -> list[dict]:
    """Predict's records, each group of them centred (`centre`); `groups[i]` names record i's group.

    A record gets its new label and probabilities and `"session": {"group", "clips"}`. Records that
    hold no label (an error, or no speech) are left as they are and do not count in their group.
    """
    if len(groups) != len(records):
        raise ValueError(f"{len(groups)} session groups for {len(records)} records")
    members: dict[Hashable, list[int]] = {}
    for i, (record, group) in enumerate(zip(records, groups)):
        if record.get("label") is not None:
            members.setdefault(group, []).append(i)
    out = [dict(r) for r in records]
    for group, idx in members.items():
        classes = list(records[idx[0]]["probabilities"])
        probs = np.array([[records[i]["probabilities"][c] for c in classes] for i in idx])
        for i, q in zip(idx, centre(probs, shrink)):
            # the label from the unrounded values, so rounding cannot create a tie (as label_body)
            out[i]["label"] = classes[int(np.argmax(q))]
            out[i]["probabilities"] = {c: round(float(v), DIGITS) for c, v in zip(classes, q)}
            out[i]["session"] = {"group": str(group), "clips": len(idx)}
    return out


SESSION_BY = ("all", "folder", "speaker")  # `serval predict --session`: what makes a group


def groups_of(clips: Sequence, by: str) -> list[str]:
    """Each clip's (`serval.clip.Clip`) session group: "all" one group, "folder" its file's folder,
    "speaker" its manifest's speaker (every clip must have one)."""
    if by not in SESSION_BY:
        raise ValueError(f"session groups are one of {SESSION_BY}, not {by!r}")
    if by == "all":
        return ["all"] * len(clips)
    if by == "folder":
        return [str(PurePath(c.path).parent) for c in clips]
    missing = [c.path for c in clips if not c.speaker]
    if missing:
        raise ValueError(
            f"--session speaker: {len(missing)} of {len(clips)} inputs have no speaker (first: {missing[0]}); "
            "give a manifest with a speaker column, or --session folder or all"
        )
    return [c.speaker for c in clips]
