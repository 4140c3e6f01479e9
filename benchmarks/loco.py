"""Leave-one-corpus-out (LOCO), the protocol that chooses the default model's recipe (issue 24).

For each corpus of the manifest, a head is fitted on every clip of the other corpora and scored on
every clip of that corpus: the nearest thing here to a language, a studio and speakers never heard.
Dev speakers of a corpus the model trains on say little about that; LOCO does.

The heads read whisper-base's 7 encoder outputs pooled once per clip (`ClipStats`, cached on disk per
front end, or pooled from a training run's all-layer encoder cache), so a fold costs a head fit only:
- `probe`: each layer's mean, standardised, logistic regression (balanced, C = 1): the issue's floor,
  benchmarks/probes.py's probe;
- `linear head`: each layer-normed layer's mean and std, the same regression: the default model's
  linear head (serval.train.linear_head), and variants of it (regularisation, corpus balance, layers,
  per-speaker standardisation, the gain-invariant front end).
Dimensions: a ridge regression (alpha by leave-one-out) per dimension, fitted where the other corpora
have it: arousal on TAVA from BAVED's levels and on BAVED from TAVA's ratings; valence and dominance
exist in TAVA alone, so they have no LOCO fold.

A corpus is scored as serval.evaluate scores it: the argmax over the classes its gold labels use.
Per corpus: UAR with a 95 % bootstrap interval (clips resampled), per-class recall, and the share of
its clips given the most frequent answer (a head that sends one corpus to one class learnt the corpus).

    python benchmarks/model_card.py --protocol loco --manifest runs/default/all.csv -o runs/loco
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from serval.atomic import atomic_write, atomic_write_text
from serval.audio import AudioError, load_audio
from serval.checkpoint import model_from_backbone
from serval.features import compute_features
from serval.fingerprint import fingerprint
from serval.metrics import bootstrap_ci, calibration, ccc, classification_scores
from serval.model import SERConfig, layer_statistics
from serval.session import SHRINK, centre
from serval.train.augment import NoiseBank, augment_wave, seeded_rng
from serval.train.cache import EncoderCache, encoder_settings
from serval.train.config import AugmentConfig
from serval.train.linear_head import fit_logistic
from serval.vocab import EMOTIONS

STATS_VERSION = 1
FIT = "one BLAS thread"  # how the heads are fitted (fit_logistic), part of their cached results' keys
LAYERS, WIDTH = 7, 512  # whisper-base: the input embedding and 6 layers, d 512
# the columns a head reads: each layer's mean (the probe's); each layer-normed layer's mean and std
# (the linear head's); the layer-normed means alone; all three
COLUMNS = {
    "raw": slice(0, LAYERS * WIDTH),
    "normed": slice(LAYERS * WIDTH, 3 * LAYERS * WIDTH),
    "normed means": slice(LAYERS * WIDTH, 2 * LAYERS * WIDTH),
    "all": slice(0, 3 * LAYERS * WIDTH),
}
# the front ends the heads read: Whisper's log-mel, the shipped gain-invariant one (peak moved to one
# level), and Whisper's log-mel of the clip moved to one RMS level first (loudness normalisation)
FRONT_ENDS = ("whisper", "gain-invariant", "loudness-normalised")
LOUDNESS_DBFS = -23.0  # EBU R 128's programme loudness, near the corpora's median RMS level
# stats[front end + suffix]: one seeded waveform-augmented copy of each clip, made by that suffix's config
AUGMENTED, PITCH_SHIFTED = " augmented", " pitch-shifted"
COPIES = {
    # speed 0.9 or 1.1, noise at 5-20 dB SNR on half the clips, Opus or MP3 at a low bitrate on half
    AUGMENTED: AugmentConfig(
        noise_prob=0.5, snr_db=(5.0, 20.0), speed_factors=(0.9, 1.1), codecs=("opus", "mp3"), codec_prob=0.5
    ),
    # 2 or 3 semitones up or down at the same tempo (serval.train.augment.shift_pitch), nothing else
    PITCH_SHIFTED: AugmentConfig(
        noise_prob=0.0, speed_factors=(1.0,), pitch_semitones=(-3.0, -2.0, 2.0, 3.0)
    ),
}


def copies_config(suffix: str, noise_dir: str | None) -> AugmentConfig:
    """The augmentation of the copies `suffix` names, its noise (if it adds any) from `noise_dir`."""
    config = COPIES[suffix]
    return dataclasses.replace(config, noise_dir=noise_dir) if config.noise_prob > 0 else config


def split_key(key: str) -> tuple[str, str]:
    """A stats key -> (front end, copies suffix or "")."""
    suffix = next((s for s in COPIES if key.endswith(s)), "")
    return key.removesuffix(suffix), suffix


def loudness_normalised(wave: np.ndarray) -> np.ndarray:
    """`wave` scaled so that its RMS is LOUDNESS_DBFS (silence as it is): a gain-free input for Whisper."""
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    return wave if rms == 0 else (wave * (10 ** (LOUDNESS_DBFS / 20) / rms)).astype(np.float32)


class ClipStats:
    """Per clip: whisper-base's 7 outputs' means (raw) and their layer-normed means and stds, cached.

    `front_end`: one of FRONT_ENDS. `augment`: the stats of each clip's seeded augmented copy instead
    (one of COPIES, `copies_config`), drawn from the clip's own samples.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        front_end: str = "whisper",
        reuse_dir: str | Path | None = None,
        augment: AugmentConfig | None = None,
    ):
        if front_end not in FRONT_ENDS:
            raise ValueError(f"front end must be one of {FRONT_ENDS}, not {front_end!r}")
        self.front_end, self.augment = front_end, augment
        self.noise = NoiseBank(augment.noise_dir) if augment and augment.noise_dir else None
        config = SERConfig.for_whisper(
            "base",
            backbone="pypi:whisper-base",
            layer_weighting="weighted",
            gain_invariant=front_end == "gain-invariant",
        )
        self.encoder = model_from_backbone(config).eval()
        # a training run's encoder cache (float16) holds these outputs: pooled, not encoded again
        self.reuse = EncoderCache(reuse_dir, encoder_settings(self.encoder, "float16")) if reuse_dir else None
        settings = {**encoder_settings(self.encoder, "float32"), "stats_version": STATS_VERSION}
        if front_end == "loudness-normalised":  # the first two front ends' caches keep their keys
            settings["loudness_dbfs"] = LOUDNESS_DBFS
        if augment is not None:
            settings["augment"] = dataclasses.asdict(augment)
        self._prefix = json.dumps(settings, sort_keys=True).encode()
        self.root = Path(cache_dir) / hashlib.sha256(self._prefix).hexdigest()[:16]
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "settings.json", json.dumps(settings, indent=2) + "\n", overwrite=True)

    def _key(self, wave: np.ndarray) -> str:
        h = hashlib.sha256(self._prefix)
        h.update(np.ascontiguousarray(wave, dtype=np.float32).tobytes())
        return h.hexdigest()

    @staticmethod
    def pool(hidden: torch.Tensor) -> np.ndarray:
        """One clip's outputs [7, T, d] -> [raw means, layer-normed means and stds] (3 x 7 x d)."""
        hidden = hidden.float()
        normed = layer_statistics(F.layer_norm(hidden, (hidden.shape[-1],))[None], None)[0]
        return torch.cat([hidden.mean(1).flatten(), normed]).numpy()

    @torch.inference_mode()
    def _encode(self, wave: np.ndarray) -> np.ndarray:
        if self.reuse is not None and self.reuse.readable(key := self.reuse.key(wave)):
            return self.pool(self.reuse.get(key)[0])
        if self.front_end == "loudness-normalised":
            wave = loudness_normalised(wave)
        cfg = self.encoder.config
        feats, lengths = compute_features([wave], n_mels=cfg.n_mels, gain_invariant=cfg.gain_invariant)
        hidden, token_lengths = self.encoder.encode(feats, lengths)
        return self.pool(hidden[0, :, : int(token_lengths[0])])

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        key = self._key(wave)
        path = self.root / key[:2] / f"{key}.npy"
        try:
            return np.load(path)
        except (OSError, ValueError):  # missing or damaged: pooled again
            if self.augment is not None:  # the same clip gets the same copy, in any order, on any run
                wave = augment_wave(wave, self.augment, self.noise, seeded_rng(int(key[:15], 16)))
            vec = self._encode(wave)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: np.save(tmp, vec), overwrite=True)
            return vec

    def rows(self, rows: Sequence, progress: bool = True) -> tuple[np.ndarray, list]:
        """Stats of the manifest rows that decode, and those rows (a clip that fails is named and left out)."""
        out, kept = [], []
        for i, row in enumerate(rows):
            try:
                out.append(self(load_audio(row.path, row.start, row.end)))
                kept.append(row)
            except AudioError as e:
                print(f"loco: skipped {e}", file=sys.stderr)
            if progress and (i + 1) % 500 == 0:
                print(f"loco: {i + 1}/{len(rows)} clips pooled", file=sys.stderr, flush=True)
        return np.stack(out).astype(np.float32), kept


# ---------------------------------------------------------------------------------------- heads


@dataclass(frozen=True)
class Head:
    """One LOCO contender: which stats it reads, how it is regularised and weighted."""

    name: str
    front_end: str = "whisper"  # one of FRONT_ENDS
    columns: str = "normed"  # a key of COLUMNS
    c: float = 1.0
    corpus_balance: float = 0.0  # a clip of a group of n clips weighs n^-power (0: not at all)
    balance_by: str = "corpus"  # the groups corpus_balance evens out: "corpus" or "language"
    per_utterance: bool = False  # each clip's stats standardised over the channels of each block
    per_speaker: bool = False  # standardise each speaker's stats by its own clips (needs several per speaker)
    layers: tuple[int, ...] | None = None  # the layers read (None: all 7)
    copies: str = ""  # a key of COPIES: each training clip's augmented copy trained on beside it ("": none)
    speaker_dims: int = 0  # the directions projected out in which training speakers differ most (0: none)

    @property
    def stats(self) -> tuple[str, ...]:
        """The keys of the stats it reads: its front end's, and its augmented copies'."""
        return (self.front_end, self.front_end + self.copies) if self.copies else (self.front_end,)

    def features(self, x: np.ndarray, speakers: Sequence[str]) -> np.ndarray:
        x = x[:, COLUMNS[self.columns]]
        if self.layers is not None:
            blocks = x.reshape(len(x), -1, LAYERS, WIDTH)
            x = blocks[:, :, list(self.layers)].reshape(len(x), -1)
        if self.per_utterance:  # a (statistic, layer) block's 512 channels: mean 0, std 1, per clip
            blocks = x.reshape(len(x), -1, WIDTH)
            centred = blocks - blocks.mean(-1, keepdims=True)
            x = (centred / (centred.std(-1, keepdims=True) + 1e-5)).reshape(len(x), -1)
        if self.per_speaker:
            x = x.copy()
            for s in set(speakers):
                idx = [i for i, v in enumerate(speakers) if v == s]
                x[idx] = (x[idx] - x[idx].mean(0)) / (x[idx].std(0) + 1e-5)
        return x


HEADS = (
    Head("probe (layer means)", columns="raw"),
    Head("linear head (layer-normed means and stds)"),
    Head("linear head, C = 0.1", c=0.1),
    Head("linear head, corpus-balanced", corpus_balance=0.5),
    Head("linear head, layers 3-6", layers=(3, 4, 5, 6)),
    Head("linear head, gain-invariant front end", front_end="gain-invariant"),
    Head("linear head, gain-invariant, C = 0.1", front_end="gain-invariant", c=0.1),
    Head("linear head, per-speaker standardised (not single-clip)", per_speaker=True),
    Head("linear head, gain-invariant, C = 0.03", front_end="gain-invariant", c=0.03),
    Head(
        "linear head, gain-invariant, C = 0.1, corpus-balanced", "gain-invariant", c=0.1, corpus_balance=0.5
    ),
    Head("probe, gain-invariant front end", front_end="gain-invariant", columns="raw"),
    Head(
        "linear head, gain-invariant, C = 0.1, waveform-augmented copies",
        "gain-invariant",
        c=0.1,
        copies=AUGMENTED,
    ),
    Head("linear head, loudness-normalised front end, C = 0.1", front_end="loudness-normalised", c=0.1),
    Head("probe, loudness-normalised front end", front_end="loudness-normalised", columns="raw"),
    Head(
        "linear head, gain-invariant, C = 0.1, per-utterance standardised",
        "gain-invariant",
        c=0.1,
        per_utterance=True,
    ),
    Head(
        "linear head, gain-invariant, C = 0.1, language-balanced",
        "gain-invariant",
        c=0.1,
        corpus_balance=0.5,
        balance_by="language",
    ),
    Head(
        "linear head, gain-invariant, C = 0.1, pitch-shifted copies",
        "gain-invariant",
        c=0.1,
        copies=PITCH_SHIFTED,
    ),
    Head(
        "linear head, gain-invariant, C = 0.1, with the raw layer means",
        "gain-invariant",
        columns="all",
        c=0.1,
    ),
    Head(
        "linear head, gain-invariant, C = 0.1, layer-normed means only",
        "gain-invariant",
        columns="normed means",
        c=0.1,
    ),
    Head(
        "linear head, gain-invariant, C = 0.1, 8 speaker directions removed",
        "gain-invariant",
        c=0.1,
        speaker_dims=8,
    ),
    Head(
        "linear head, gain-invariant, C = 0.1, 32 speaker directions removed",
        "gain-invariant",
        c=0.1,
        speaker_dims=32,
    ),
)
PROBE, GAIN_INVARIANT_HEAD = HEADS[0], HEADS[5]  # the floor; the shipped model's front end
# the shipped model's classes: its linear head alone (model.linear_weight 1), fitted as this one is
SHIPPED_HEAD = HEADS[6]
AROUSAL_HEADS = (PROBE, HEADS[1], GAIN_INVARIANT_HEAD)  # the ridge probe, and on the linear head's stats
SESSION_HEADS = (PROBE, SHIPPED_HEAD)  # in session mode too: the floor, and the shipped model's


def fit_classes(head: Head, x: np.ndarray, labels: Sequence[str], groups: Sequence[str]):
    """The standardised, balanced logistic regression of `head` on labelled training clips (`groups`:
    each clip's corpus or language, as `head.balance_by` says)."""
    weights = None
    if head.corpus_balance:
        counts = Counter(groups)
        weights = np.array([counts[g] ** -head.corpus_balance for g in groups])
        weights *= len(weights) / weights.sum()
    return fit_logistic(x, list(labels), head.c, weights)


def without_speaker_subspace(
    fitted: np.ndarray, tested: np.ndarray, labels: Sequence[str], speakers: Sequence[str], dims: int
) -> tuple[np.ndarray, np.ndarray]:
    """Both sets, standardised on `fitted`, with the `dims` directions projected out in which the
    training speakers' mean stats differ most (nuisance attribute projection). A speaker's mean weighs
    each of its classes alike and one-class speakers are left out, so that the directions hold voice,
    studio and language rather than emotion."""
    mean, scale = fitted.mean(0), fitted.std(0) + 1e-5
    fitted, tested = (fitted - mean) / scale, (tested - mean) / scale
    labels, speakers = np.asarray(labels), np.asarray(speakers)
    means = []
    for s in sorted(set(speakers)):
        mine = speakers == s
        classes = sorted(set(labels[mine]))
        if len(classes) >= 2:
            means.append(np.mean([fitted[mine & (labels == c)].mean(0) for c in classes], 0))
    spread = np.array(means) - np.mean(means, 0)
    basis = np.linalg.svd(spread, full_matrices=False)[2][:dims]
    return fitted - fitted @ basis.T @ basis, tested - tested @ basis.T @ basis


def fit_ridge(x: np.ndarray, y: np.ndarray):
    """The ridge probe of one dimension: standardised, alpha by leave-one-out."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 6, 17))).fit(x, y)


# -------------------------------------------------------------------------------------- scoring


def own_columns(
    gold: Sequence[str], values: np.ndarray, classes: Sequence[str], absent: float
) -> tuple[list[str], np.ndarray]:
    """(the corpus's own classes, `values` [N, classes] cut to their columns): a corpus is scored over
    the classes its gold labels use; one the head never trained on is a column of `absent`."""
    own = [c for c in EMOTIONS if c in set(gold)]
    full = np.full(len(values), absent)
    return own, np.stack([values[:, list(classes).index(c)] if c in classes else full for c in own], 1)


def corpus_scores(gold: Sequence[str], probs: np.ndarray, classes: Sequence[str], bootstrap: int) -> dict:
    """UAR (argmax over the corpus's own classes) with its CI, per-class recall, the top answer's share."""
    own, masked = own_columns(gold, probs, classes, absent=0.0)
    pred = [own[k] for k in masked.argmax(1)]
    scores = classification_scores(gold, pred, own)
    top, n_top = Counter(pred).most_common(1)[0]
    return {
        "n": len(gold),
        "uar": scores["uar"],
        "ci": bootstrap_ci(gold, pred, own, n_resamples=bootstrap) if bootstrap else None,
        "recall": {c: r for c, r in scores["recall"].items() if r is not None},
        "confusion": scores["confusion"],
        "classes": own,
        "top": [top, n_top / len(pred)],
    }


# a head's logits divided by T before the softmax (select.linear_head_temperature): the argmax, and so
# every UAR, stays; only how sure the probabilities are changes
TEMPERATURES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def logits_of(clf, x: np.ndarray) -> np.ndarray:
    """A fitted `fit_classes` pipeline's logits [N, classes] (its probabilities are their softmax)."""
    z = clf.decision_function(x)
    return np.stack([-z / 2, z / 2], axis=1) if z.ndim == 1 else z


def corpus_calibration(gold: Sequence[str], logits: np.ndarray, classes: Sequence[str]) -> dict:
    """{T: serval.metrics.calibration} of one corpus, each T in TEMPERATURES: the softmax of logits / T
    over the corpus's own classes, as it is scored (a class no training clip had gets no probability)."""
    own, cols = own_columns(gold, logits, classes, absent=-np.inf)
    gold_index = np.array([own.index(g) for g in gold])
    out = {}
    for t in TEMPERATURES:
        z = cols / t
        p = np.exp(z - z.max(1, keepdims=True))
        out[str(t)] = calibration(gold_index, p / p.sum(1, keepdims=True))
    return out


def sessions(probs: np.ndarray, rows: Sequence) -> dict[str, np.ndarray]:
    """One corpus's probabilities as scored in session mode (serval.session.centre): the corpus as one
    group (a folder of clips, no speaker labels), and each speaker's clips as a group."""
    out = {}
    for suffix, group_of in SESSIONS.items():
        groups = [group_of(r) for r in rows]
        centred = np.empty_like(probs)
        for g in set(groups):
            idx = [i for i, v in enumerate(groups) if v == g]
            centred[idx] = centre(probs[idx])
        out[suffix] = centred
    return out


SESSIONS = {
    " (session: each corpus)": lambda r: r.corpus,
    " (session: each speaker)": lambda r: (r.corpus, r.speaker),
}


def run_folds(
    rows: Sequence,
    stats: dict[str, np.ndarray],
    heads: Sequence[Head],
    bootstrap: int,
    log: Callable = print,
    session: bool = False,
) -> dict:
    """{corpus: {head name: scores}} for every corpus with at least two classes, one fold each;
    `session`: scored in session mode too (`sessions`), as "name (session: ...)"."""
    corpora = sorted({r.corpus for r in rows})
    labels = np.array([r.label or "" for r in rows])
    corpus_of = np.array([r.corpus for r in rows])
    groups = {"corpus": corpus_of, "language": np.array([r.language or r.corpus for r in rows])}
    speakers = [r.speaker or r.corpus for r in rows]
    labelled, folds = labels != "", []  # (corpus, the rows trained on, the rows scored)
    for corpus in corpora:
        test = corpus_of == corpus
        if len(set(labels[test & labelled])) >= 2:
            folds.append((corpus, ~test & labelled, test & labelled))
    out: dict = {c: {} for c, _, _ in folds}
    for head in heads:
        # the same in every fold: made once per head (x[0] the clips, x[1] their augmented copies)
        x = [head.features(stats[key], speakers) for key in head.stats]
        for corpus, train, scored in folds:
            n = len(x)
            fitted, tested = np.concatenate([part[train] for part in x]), x[0][scored]
            if head.speaker_dims:
                trained_on = np.tile(np.array(speakers)[train], n)
                fitted, tested = without_speaker_subspace(
                    fitted, tested, np.tile(labels[train], n), trained_on, head.speaker_dims
                )
            group = groups[head.balance_by][train]
            clf = fit_classes(head, fitted, np.tile(labels[train], n), np.tile(group, n))
            probs = clf.predict_proba(tested)
            gold, cls = list(labels[scored]), list(clf.classes_)
            out[corpus][head.name] = corpus_scores(gold, probs, cls, bootstrap)
            out[corpus][head.name]["calibration"] = corpus_calibration(gold, logits_of(clf, tested), cls)
            log(f"loco {corpus}: {head.name}: UAR {100 * out[corpus][head.name]['uar']:.1f}")
            if session:
                mine = [r for r, keep in zip(rows, scored) if keep]
                for suffix, centred in sessions(probs, mine).items():
                    out[corpus][head.name + suffix] = corpus_scores(gold, centred, cls, bootstrap)
    return out


def arousal_folds(
    rows: Sequence, stats: dict[str, np.ndarray], heads: Sequence[Head], bootstrap: int
) -> dict:
    """{corpus: {head name: (CCC, CI, n)}}: arousal of each rated corpus from a ridge fitted on the others."""
    from probes import ccc_ci

    gold = np.array([np.nan if r.arousal is None else r.arousal for r in rows], dtype=np.float64)
    corpus_of = np.array([r.corpus for r in rows])
    speakers = [r.speaker or r.corpus for r in rows]
    rated, folds = np.isfinite(gold), []  # (corpus, the rows scored, the rows trained on)
    for corpus in sorted(set(corpus_of[rated])):
        test, train = (corpus_of == corpus) & rated, (corpus_of != corpus) & rated
        if train.sum() >= 10:
            folds.append((corpus, test, train))
    out: dict = {c: {} for c, _, _ in folds}
    for head in heads:
        x = head.features(stats[head.front_end], speakers)  # the same in every fold: made once per head
        for corpus, test, train in folds:
            pred = np.clip(fit_ridge(x[train], gold[train]).predict(x[test]), 0.0, 1.0)
            scores = (ccc(gold[test], pred), ccc_ci(gold[test], pred, bootstrap), int(test.sum()))
            out[corpus][head.name] = scores
    return out


def head_folds(
    rows: Sequence, stats: dict[str, np.ndarray], bootstrap: int, cache: Path, heads: Sequence[Head] = HEADS
) -> tuple[dict, dict]:
    """`run_folds` of `heads` and `arousal_folds` of AROUSAL_HEADS, kept in `cache` (a JSON file per rows,
    heads and settings), so that a rerun which only adds trained models does not fit the heads again."""
    described = [[r.path, r.start, r.end, r.label, r.corpus, r.speaker, r.arousal] for r in rows]
    key = fingerprint(
        [
            json.dumps(described),
            repr(tuple(heads)),
            repr(AROUSAL_HEADS),
            f"{bootstrap} {STATS_VERSION} {TEMPERATURES} {FIT}",
        ]
    )
    path = cache / f"heads-{key[:16]}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        return saved["classes"], saved["arousal"]
    classes = run_folds(rows, stats, heads, bootstrap)
    arousal = arousal_folds(rows, stats, AROUSAL_HEADS, bootstrap)
    atomic_write_text(path, json.dumps({"classes": classes, "arousal": arousal}) + "\n", overwrite=True)
    return classes, arousal


def session_folds(rows: Sequence, stats: dict[str, np.ndarray], bootstrap: int, cache: Path) -> dict:
    """`run_folds` of SESSION_HEADS in session mode, kept in `cache` apart from `head_folds`' file."""
    described = [[r.path, r.start, r.end, r.label, r.corpus, r.speaker] for r in rows]
    key = fingerprint(
        [
            json.dumps(described),
            repr(SESSION_HEADS),
            f"{bootstrap} {STATS_VERSION} {SHRINK} {list(SESSIONS)} {FIT}",
        ]
    )
    path = cache / f"sessions-{key[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    classes = run_folds(rows, stats, SESSION_HEADS, bootstrap, session=True)
    atomic_write_text(path, json.dumps(classes) + "\n", overwrite=True)
    return classes


LINEAR_WEIGHTS = {
    "network alone": 0.0,
    "linear weight 0.25": 0.25,
    "linear weight 0.75": 0.75,
    "linear head alone": 1.0,
}


def _predict(
    system, waves: list[np.ndarray], batch_size: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(probabilities, the network's alone where the model has a linear head, else None, scores)."""
    models = getattr(system, "models", [])
    if not (len(models) == 1 and models[0].config.linear_head):
        parts = [
            system.predict_waveforms(waves[i : i + batch_size]) for i in range(0, len(waves), batch_size)
        ]
        return np.concatenate([p for p, _ in parts]), None, np.concatenate([s for _, s in parts])
    out = [_two_heads(models[0], waves[i : i + batch_size]) for i in range(0, len(waves), batch_size)]
    return tuple(np.concatenate([o[k] for o in out]) for k in range(3))


@torch.inference_mode()
def _two_heads(model, waves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One encoder pass, then the head with and without the linear head (`SERModel.head` adds the
    linear head's probabilities only while the config says so)."""
    cfg = model.config
    feats, lengths = compute_features(
        waves, n_mels=cfg.n_mels, pad_to_30s=cfg.pad_to_30s, gain_invariant=cfg.gain_invariant
    )
    hidden, token_lengths = model.encode(feats, lengths)
    both = model.head(hidden, token_lengths)
    cfg.linear_head = False
    try:
        network = model.head(hidden, token_lengths)
    finally:
        cfg.linear_head = True
    return (
        both.logits.float().softmax(-1).numpy(),
        network.logits.float().softmax(-1).numpy(),
        both.scores.float().numpy(),
    )


def mixtures(probs: np.ndarray, network: np.ndarray | None, weight: float = 0.5) -> dict[str, np.ndarray]:
    """The model's probabilities, and with a linear head the other weightings of its two heads: the model
    gives the head `weight` (its config's linear_weight), so the head's own are recovered from the two."""
    out = {"": probs}
    if network is not None:
        linear = probs if weight == 1 else np.clip((probs - (1 - weight) * network) / weight, 0.0, 1.0)
        for label, w in LINEAR_WEIGHTS.items():
            out[f" ({label})"] = (1 - w) * network + w * linear
    return out


def model_folds(
    rows: Sequence, spec: str, name: str, bootstrap: int, cache: Path | None = None
) -> tuple[dict, dict]:
    """({corpus: {name: scores}}, {corpus: {name: arousal (CCC, CI, n)}}) of trained models on every corpus.
    `spec` may hold `{corpus}`: then each corpus is scored by its own fold's model
    (benchmarks/loco_folds.py), which never trained on it. A model folder's scores are kept in `cache`,
    keyed by its files and the clips, so a rerun scores only new or changed models."""
    import serval

    classes: dict = {}
    arousal: dict = {}
    model = None
    for corpus in sorted({r.corpus for r in rows}):
        mine = [r for r in rows if r.corpus == corpus and (r.label or r.arousal is not None)]
        path = Path(spec.format(corpus=corpus))
        if not mine or "{corpus}" in spec and not path.exists():
            continue
        key = None
        if cache is not None and (path / "model.safetensors").is_file():
            described = json.dumps([[r.path, r.start, r.end, r.label, r.arousal, r.speaker] for r in mine])
            parts = [path / "model.safetensors", path / "config.json", described, f"{name} {bootstrap}"]
            parts.append(f"sessions {list(SESSIONS)} {SHRINK}")  # a new session rule: scored again
            key = cache / "models" / f"{fingerprint(parts)[:24]}.json"
            if key.is_file():
                saved = json.loads(key.read_text())
                classes.update(saved["classes"])
                arousal.update(saved["arousal"])
                continue
        if "{corpus}" in spec or model is None:
            model = serval.load(str(path) if path.exists() else spec, engine="torch")
        # as JSON gives them back, so a cached and a fresh result look the same (lists, not tuples)
        mine_classes, mine_arousal = json.loads(json.dumps(score_model(model, corpus, mine, name, bootstrap)))
        classes.update(mine_classes)
        arousal.update(mine_arousal)
        if key is not None:
            key.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                key, json.dumps({"classes": mine_classes, "arousal": mine_arousal}), overwrite=True
            )
    return classes, arousal


def score_model(
    system, corpus: str, rows: Sequence, name: str, bootstrap: int, batch_size: int = 16
) -> tuple[dict, dict]:
    """One corpus's ({corpus: {name (+ head mixture): scores}}, {corpus: {name: arousal}}) of one model."""
    from probes import ccc_ci

    probs, network, scores = _predict(system, [load_audio(r.path, r.start, r.end) for r in rows], batch_size)
    classes, arousal = {}, {}
    labelled = [i for i, r in enumerate(rows) if r.label]
    gold = [rows[i].label for i in labelled]
    if len(set(gold)) >= 2:
        weight = system.models[0].config.linear_weight if network is not None else 0.5
        parts = mixtures(probs[labelled], None if network is None else network[labelled], weight)
        parts.update({k: p for k, p in sessions(probs[labelled], [rows[i] for i in labelled]).items()})
        classes[corpus] = {
            name + k: corpus_scores(gold, p, list(system.classes), bootstrap) for k, p in parts.items()
        }
    rated = [i for i, r in enumerate(rows) if r.arousal is not None]
    if rated and "arousal" in system.trained_dimensions:
        truth = np.array([rows[i].arousal for i in rated])
        pred = scores[rated, list(system.dimensions).index("arousal")]
        arousal[corpus] = {name: (ccc(truth, pred), ccc_ci(truth, pred, bootstrap), len(rated))}
    return classes, arousal


# ------------------------------------------------------------------------------------- markdown


def _cell(s: dict | None) -> str:
    if not s:
        return "–"
    ci = s.get("ci")
    return f"{100 * s['uar']:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def contender_table(folds: dict, names: Sequence[str], floor: str) -> list[str]:
    """System x corpus UAR table [95 % CI]: each system's mean over the corpora it has, and against
    `floor` on those corpora (how many it is ahead on, the mean difference)."""
    corpora = list(folds)
    lines = [f"| system | {' | '.join(corpora)} | mean | against {floor} |"]
    lines.append("| --- |" + " --- |" * (len(corpora) + 2))
    for n in names:
        have = [c for c in corpora if n in folds[c]]
        if not have:
            continue
        mean = 100 * np.mean([folds[c][n]["uar"] for c in have])
        diffs = [100 * (folds[c][n]["uar"] - folds[c][floor]["uar"]) for c in have if floor in folds[c]]
        against = (
            f"ahead on {sum(d > 0 for d in diffs)} of {len(diffs)}, {np.mean(diffs):+.1f}" if diffs else "–"
        )
        cells = " | ".join(_cell(folds[c].get(n)) for c in corpora)
        lines.append(f"| {n} | {cells} | **{mean:.1f}** ({len(have)}) | {against if n != floor else '–'} |")
    return lines


def summary_table(folds: dict, model: str, floor: str, others: Sequence[str] = ()) -> list[str]:
    """`model` against `floor` per corpus: both UARs with CIs, the difference, and `others` beside them."""
    lines = [f"| corpus | {model} | {floor} | difference | " + " | ".join(others) + " |"]
    lines.append("| --- |" + " --- |" * (3 + len(others)))
    diffs = []
    for corpus, cell in folds.items():
        if model not in cell or floor not in cell:
            continue
        diffs.append(100 * (cell[model]["uar"] - cell[floor]["uar"]))
        rest = [_cell(cell.get(n)) for n in others]
        lines.append(
            f"| {corpus} | {_cell(cell[model])} | {_cell(cell[floor])} | {diffs[-1]:+.1f} | "
            + " | ".join(rest)
            + " |"
        )
    ahead = sum(d > 0 for d in diffs)
    means = [np.mean([c[n]["uar"] for c in folds.values() if model in c and n in c]) for n in (model, floor)]
    lines.append(
        f"| mean ({len(diffs)} corpora; ahead on {ahead}) | **{100 * means[0]:.1f}** | **{100 * means[1]:.1f}** | "
        f"**{np.mean(diffs):+.1f}** | " + " | ".join("" for _ in others) + " |"
    )
    return lines


def recall_table(folds: dict, name: str) -> list[str]:
    """Per-class recall of one system on each corpus, and the share of its most frequent answer."""
    lines = [
        f"| corpus | {' | '.join(EMOTIONS)} | most frequent answer |",
        "| --- |" + " --- |" * (len(EMOTIONS) + 1),
    ]
    for corpus, cell in folds.items():
        if name not in cell:
            continue
        s = cell[name]
        recall = [f"{100 * s['recall'][c]:.0f}" if c in s["recall"] else "–" for c in EMOTIONS]
        lines.append(f"| {corpus} | " + " | ".join(recall) + f" | {s['top'][0]} {100 * s['top'][1]:.0f} % |")
    return lines


def chosen_temperature(folds: dict, name: str) -> float:
    """The T of TEMPERATURES with the lowest held-out log-likelihood loss of `name`, averaged over corpora."""
    have = [cell[name]["calibration"] for cell in folds.values() if "calibration" in cell.get(name, {})]
    return min(TEMPERATURES, key=lambda t: np.mean([c[str(t)]["nll"] for c in have]))


def calibration_table(folds: dict, names: Sequence[str]) -> list[str]:
    """Per system and T: expected calibration error per corpus (%), and over the corpora the mean ECE,
    log-likelihood loss, top probability and accuracy; the T that `chosen_temperature` picks in bold."""
    corpora = [c for c in folds if any("calibration" in folds[c].get(n, {}) for n in names)]
    lines = [
        f"| system | T | {' | '.join(corpora)} | mean ECE | mean NLL | mean top probability | accuracy |"
    ]
    lines.append("| --- | --- |" + " --- |" * (len(corpora) + 4))
    for name in names:
        have = [c for c in corpora if "calibration" in folds[c].get(name, {})]
        if not have:
            continue
        best = chosen_temperature(folds, name)
        for t in TEMPERATURES:
            cal = {c: folds[c][name]["calibration"][str(t)] for c in have}
            cells = " | ".join(f"{100 * cal[c]['ece']:.1f}" if c in cal else "–" for c in corpora)
            means = [np.mean([v[k] for v in cal.values()]) for k in ("ece", "nll", "confidence", "accuracy")]
            mark = "**" if t == best else ""
            lines.append(
                f"| {name} | {mark}{t:g}{mark} | {cells} | {100 * means[0]:.1f} | {means[1]:.3f} | "
                f"{100 * means[2]:.1f} | {100 * means[3]:.1f} |"
            )
    return lines


def arousal_table(folds: dict, names: Sequence[str]) -> list[str]:
    lines = ["| corpus (clips) | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for corpus, cell in folds.items():
        n = next(iter(cell.values()))[2]
        row = []
        for name in names:
            value, ci, _ = cell.get(name, (None, None, None))
            row.append("–" if value is None else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
        lines.append(f"| {corpus} ({n}) | " + " | ".join(row) + " |")
    return lines
