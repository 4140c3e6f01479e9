"""Dev numbers of training runs side by side, per corpus, from the runs' own encoder cache.

For each run folder (`NAME=RUN_DIR`), its `best/` model's head is scored on the cached
(float16, clean) encoder outputs of one split: UAR per corpus, each clip's prediction the argmax
over the classes its corpus has in that split (as `serval eval` and benchmarks/model_card.py
score), pooled UAR over those predictions, and CCC per dimension where the corpus carries it. Cheap (no encoder pass), and
equal to scoring the audio up to float16 rounding of the encoder outputs; the shipped model's
figures in MODEL_CARD.md come from benchmarks/model_card.py on the audio itself.

    python benchmarks/variants.py --manifest runs/default/all.csv --cache-dir runs/cache/whisper-base \
        v1=runs/default/v1 v2=runs/default/v2 -o runs/variants.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from serval.checkpoint import load_model
from serval.metrics import ccc, uar
from serval.train.cache import EncoderCache, encoder_settings
from serval.train.config import TrainConfig
from serval.train.data import CachedDataset, collate, crop, load_example, read_split
from serval.train.ddp import Dist
from serval.train.scoring import split_outputs
from serval.vocab import SAMPLE_RATE


class CachedHead:
    """A serval model scored on a training run's encoder cache: its head on the cached (float16)
    encoder outputs of each clip, the encoder run only for clips not in the cache.

    The same outputs as the model on the audio up to float16 rounding of the encoder outputs
    (the old default model's test UARs came out identical both ways). For benchmarks/model_card.py:
    the predictor interface of serval.evaluate (name, classes, dimensions, fingerprint, predict_waveforms).
    """

    def __init__(self, model_dir: str | Path, cache_dir: str | Path, name: str | None = None):
        self.model = load_model(model_dir)
        self.classes, self.dimensions = self.model.config.classes, self.model.config.dimensions
        self.trained_dimensions = tuple(self.model.config.trained_dimensions)  # the others are not scored
        self.name = name or self.model.config.name
        self.cache = EncoderCache(cache_dir, encoder_settings(self.model, "float16"))
        digest = hashlib.sha1(b"cached-head")
        digest.update((Path(model_dir) / "model.safetensors").read_bytes())
        self.fingerprint = digest.hexdigest()

    def _hidden(self, wave) -> torch.Tensor:
        key = self.cache.key(wave)
        if not self.cache.readable(key):
            self.cache.encode_missing(self.model, [wave], [key], 1, "cpu")
        return self.cache.get(key)[0]

    @torch.inference_mode()
    def predict_waveforms(self, waves, batch_size: int = 16, progress: bool = False):
        probs, scores = [], []
        for s in range(0, len(waves), batch_size):
            items = [{"index": i, "input": self._hidden(w), "target": torch.zeros(1), "dims": torch.zeros(1),
                      "dims_mask": torch.zeros(1, dtype=torch.bool)} for i, w in enumerate(waves[s : s + batch_size])]  # fmt: skip
            batch = collate(items)
            out = self.model.cached_forward(batch["input"], batch["lengths"])
            probs.append(out.logits.float().softmax(-1).numpy())
            scores.append(out.scores.float().numpy())
        return np.concatenate(probs), np.concatenate(scores)


def cached_split(manifest: str, split: str, model, cache_dir: str, cfg: TrainConfig) -> CachedDataset:
    """The clean cached encoder outputs of one split, keyed exactly as training keys them."""
    examples = read_split(manifest, split, model.config)
    cache = EncoderCache(cache_dir, encoder_settings(model, "float16"))
    keys = []
    for ex in examples:
        wave = crop(load_example(ex, 30.0, None), 30 * SAMPLE_RATE, None)
        keys.append([cache.key(wave)])
    return CachedDataset(examples, keys, cache, cfg, train=False)


def scores(models: list, dataset: CachedDataset, cfg: TrainConfig) -> dict:
    """{corpus: {"uar", "n", dims..., "recall": {class: clips right / clips}}} plus "pooled" for one
    model (or an ensemble's mean) on one cached split."""
    model = models[0]
    probs, dims, idx = split_outputs(models, dataset, cfg, torch.device("cpu"), Dist(), 32)
    exs = [dataset.examples[int(i)] for i in idx]
    classes = list(model.config.classes)
    out: dict = {}
    groups = {"pooled": list(range(len(exs)))}
    for k, ex in enumerate(exs):
        groups.setdefault((ex.clip.corpus or ""), []).append(k)
    # as serval eval and the model card score: each clip's argmax over the classes its corpus has
    own = {
        c: sorted({exs[k].label for k in ks if exs[k].label >= 0})
        for c, ks in groups.items()
        if c != "pooled"
    }
    guesses = {
        k: own[(ex.clip.corpus or "")][int(probs[k][own[(ex.clip.corpus or "")]].argmax())]
        for k, ex in enumerate(exs)
        if ex.label >= 0
    }
    for name, members in groups.items():
        row = {}
        labelled = [k for k in members if exs[k].label >= 0]
        if len({exs[k].label for k in labelled}) > 1:
            gold = [classes[exs[k].label] for k in labelled]
            guess = [classes[guesses[k]] for k in labelled]
            row["uar"], row["n"] = 100 * uar(gold, guess, classes), len(labelled)
            row["recall"] = {
                c: f"{sum(g == h == c for g, h in zip(gold, guess))}/{gold.count(c)}"
                for c in classes
                if c in gold
            }
        for j, dim in enumerate(model.config.dimensions):
            rated = [k for k in members if exs[k].dims is not None and exs[k].dims[j] is not None]
            if name != "pooled" and len(rated) >= 2:
                row[dim] = ccc([exs[k].dims[j] for k in rated], dims[rated, j])
        out[name] = row
    return out


def table(results: dict[str, dict], split: str) -> str:
    """Markdown: one row per run; UAR per corpus, pooled, then the CCC columns."""
    corpora = sorted({c for r in results.values() for c in r if c != "pooled" and "uar" in r[c]})
    dim_cols = sorted(
        {(c, d) for r in results.values() for c, v in r.items() for d in v if d not in ("uar", "n", "recall")}
    )
    head = [f"{c} UAR" for c in corpora] + ["pooled UAR"] + [f"{c} {d} CCC" for c, d in dim_cols]
    lines = [f"| run ({split}) | " + " | ".join(head) + " |", "| --- " * (len(head) + 1) + "|"]
    for name, r in results.items():
        cells = [f"{r[c]['uar']:.1f}" if "uar" in r.get(c, {}) else "" for c in corpora]
        cells.append(f"{r['pooled']['uar']:.1f}")
        cells += [f"{r[c][d]:.3f}" if d in r.get(c, {}) else "" for c, d in dim_cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recall_table(results: dict[str, dict], corpus: str, split: str) -> str:
    """Markdown: one row per run, the clips of each class of `corpus` it got right."""
    classes = list(next(iter(results.values()))[corpus]["recall"])
    lines = [
        f"| run ({split}, {corpus}) | " + " | ".join(classes) + " |",
        "| --- " * (len(classes) + 1) + "|",
    ]
    lines += [
        f"| {name} | " + " | ".join(r[corpus]["recall"][c] for c in classes) + " |"
        for name, r in results.items()
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "runs",
        nargs="+",
        metavar="NAME=RUN_DIR",
        help="a run folder (its best/) or a model folder; RUN_A+RUN_B: their ensemble (mean probabilities)",
    )
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--split", default="dev")
    ap.add_argument(
        "--recall", default=None, metavar="CORPUS", help="also a table of CORPUS's clips right per class"
    )
    ap.add_argument("-o", "--output", default=None, help="also write the table (and .json) here")
    args = ap.parse_args()
    cfg = TrainConfig(progress=False)
    results, dataset = {}, None
    for spec in args.runs:
        name, _, run = spec.partition("=")
        models = [load_model(Path(r) / "best" if (Path(r) / "best").is_dir() else r) for r in run.split("+")]
        if dataset is None:  # the encoder (and so every key) is the same for every run
            dataset = cached_split(args.manifest, args.split, models[0], args.cache_dir, cfg)
        cfg.model = models[0].config
        results[name] = scores(models, dataset, cfg)
    text = table(results, args.split)
    if args.recall:
        text += "\n\n" + recall_table(results, args.recall, args.split)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
        Path(args.output).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
